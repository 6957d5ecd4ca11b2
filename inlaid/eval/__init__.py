"""Per-task accuracy: the built-in task suite, `inlaid eval` (variants side by side), perplexity and
the lm-eval model type."""
