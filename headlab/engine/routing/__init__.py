"""Input-dependent masks: calibration prompts clustered by a sentence encoder, one mask per cluster, and the router that picks a mask per input."""
