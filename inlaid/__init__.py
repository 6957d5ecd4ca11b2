"""inlaid: multi-task GPTQ quantization and multi-LoRA serving on one low-bit base model."""

__version__ = "0.1.0"
