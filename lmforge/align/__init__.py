"""Alignment after SFT: DPO, a reward model, and RL with verifiable rewards (GRPO)."""
