"""Getting quality back after pruning: knowledge distillation, 1-/2-bit quantisation, the recipes that chain them, and encoder agreement metrics."""
