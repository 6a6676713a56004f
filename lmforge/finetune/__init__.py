"""Fine-tuning: conversation data for SFT (`data`), its config section (`config`), LoRA adapters (`lora`)."""
