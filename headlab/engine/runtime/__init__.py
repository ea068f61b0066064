"""Running a masked model: layer replay and the prefix cache, perplexity and generation, attention maps, the compact sparse path, parameter and FLOP cost."""
