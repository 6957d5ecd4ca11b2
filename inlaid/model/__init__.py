"""Models: base-model loading (HF dir, GGUF, embedded default, dummy shapes) and PEFT LoRA adapters."""
