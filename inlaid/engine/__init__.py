"""Serving engine (continuous batching, paged KV cache, adapter manager, scheduler): not built yet."""
