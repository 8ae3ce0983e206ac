"""lorakit: LoRA fine-tuning toolkit."""
