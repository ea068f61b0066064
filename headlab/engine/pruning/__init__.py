"""From scores to masks: budget selection, reaching a parameter size, compensation biases, hard-concrete (L0) soft masks, and the strategies that measure and re-measure (strategies/)."""
