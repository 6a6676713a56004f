"""Alignment after SFT: DPO on preference pairs (`dpo`), reward models (`reward`), and RL with
verifiable rewards (`grpo`), each an objective on the shared training loop (lmforge/train/loop.py).
Their config sections (torch-free) are in `config`; preference pairs are read and built in `pairs`."""
