"""Evaluation of (pruned) checkpoints: per-domain perplexity, multiple-choice accuracy, optional lm-eval."""
