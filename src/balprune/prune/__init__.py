"""Pruning passes over whole checkpoints: planning, one-shot and iterative masks, packing."""
