"""The `python -m engine` command line: one module per group of verbs."""
