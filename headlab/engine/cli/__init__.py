"""The `python -m headlab` command line: shared pieces in common, one module per group of verbs, main ties them."""
