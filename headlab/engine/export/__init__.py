"""A mask made physical: surgery on a private copy of the model, and the atomic writer of a smaller Hugging Face folder with its manifest."""
