"""The common ground every other folder builds on: the mask, the model handle and the adapter interface, thread-scoped hooks and gates that apply a mask per call, tokens, objectives, user errors."""
