"""A mask made physical: surgery on a private copy of the model, the atomic writer of a smaller Hugging Face folder
with its manifest, and the GGUF file llama.cpp and Ollama run (gguf.py, deploy.py), checked with llama.cpp's own
tools (llama_cpp.py)."""
