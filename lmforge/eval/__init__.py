"""Evaluation: validation loss and bits per byte (lmforge/eval/loss.py); benchmarks come later."""

from lmforge.eval.loss import evaluate_loss, token_byte_lengths

__all__ = ["evaluate_loss", "token_byte_lengths"]
