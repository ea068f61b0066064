"""The `python -m engine` command line: shared pieces in common, one module per group of verbs, main ties them."""
