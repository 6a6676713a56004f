"""Fine-tuning: supervised fine-tuning data and LoRA adapters (lmforge/finetune/lora.py)."""
