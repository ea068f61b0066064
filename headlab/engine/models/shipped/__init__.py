"""Models shipped as PyPI packages that need more than a folder lookup to open (dequantising a GGUF)."""
