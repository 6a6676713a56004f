"""Evaluation: validation loss and bits per byte (loss.py), and the benchmarks of `lmforge eval`:
offline data (data.py), task readers (tasks/), log-likelihood scoring (scoring.py), metrics and
the CORE aggregate (runner.py), the command (cli.py), an lm-evaluation-harness model (harness.py)."""

from lmforge.eval.loss import evaluate_loss, token_byte_lengths

__all__ = ["evaluate_loss", "token_byte_lengths"]
