"""Reconstruction after structured removal: the weights that remain re-fitted to the dense outputs, no training.

    from headlab.engine.pruning.reconstruct import obs_prune, refit
    mask = refit(handle, mask, texts)                   # re-solve what a mask keeps
    mask = obs_prune(handle, heads, channels, texts)    # structured OBS chooses per layer, then re-solves

`least_squares` holds the closed-form solves (ridge with intercept, structured OBS), `layerwise`
the walk over the layers (headlab.engine.runtime.replay), `budgets` the per-layer allocation of a
global budget. The result is a PruneMask carrying compact refits (headlab.engine.core.refit).
"""

from headlab.engine.pruning.reconstruct.layerwise import RefitConfig, obs_prune, refit
from headlab.engine.pruning.reconstruct.least_squares import Moments, obs_select, ridge_fit

__all__ = ["Moments", "RefitConfig", "obs_prune", "obs_select", "refit", "ridge_fit"]
