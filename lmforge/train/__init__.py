"""Pre-training: the loop (`pretrain`), optimizers, learning-rate schedules, training checkpoints,
the loss-spike guard and the metrics logger. Entry point: `lmforge pretrain` (lmforge/train/cli.py).
"""
