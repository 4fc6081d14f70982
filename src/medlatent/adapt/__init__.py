"""Adapting pretrained encoders with few trainable parameters (LoRA, adapters, prompts, MIL)."""
