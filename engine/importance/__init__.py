"""How much each head, FFN channel and block matters: the streaming capture pass, the criteria and their registry, depth criteria, gate gradients, and diagnostics that explain a head's score."""
