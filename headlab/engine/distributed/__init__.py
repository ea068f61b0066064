"""Data-parallel long jobs under torchrun (torch.distributed): the ranks of one job as a `World` the engine calls split their work by (world)."""
