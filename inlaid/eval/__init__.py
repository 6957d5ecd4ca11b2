"""Task suite, metrics and lm-eval integration: not built yet."""
