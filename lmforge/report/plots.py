"""Training curves as PNG files: loss (train and validation), learning rate, throughput, and the
benchmark scores logged during training (train.eval_tasks)."""

from __future__ import annotations

from pathlib import Path

from lmforge.report.metrics import Metrics


def _figure(title: str, ylabel: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.6), dpi=110)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    return fig, ax


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


def _smoothed(points: list[tuple[int, float]]) -> tuple[list[int], list[float]]:
    """A centred running median over ~1/25 of the run (narrower at the ends): the trend under
    step-to-step noise."""
    import numpy as np

    steps, values = zip(*points)
    values = np.asarray(values, dtype=float)
    half = max(1, len(values) // 50)
    trend = [float(np.median(values[max(0, i - half): i + half + 1])) for i in range(len(values))]
    return list(steps), trend


def plot_loss(metrics: Metrics, path: Path) -> bool:
    """Train loss per step (raw and its running median) with validation loss where evaluated.

    Validation bits per byte is the same curve in other units, so it goes in the table, not here.
    """
    train, val = metrics.train("loss"), metrics.val("val_loss")
    if not train and not val:
        return False
    fig, ax = _figure("Loss", "cross-entropy (nats/token)")
    if train:
        ax.plot(*zip(*train), color="tab:blue", linewidth=0.7, alpha=0.5)
        ax.plot(*_smoothed(train), label="train (running median)", color="tab:blue", linewidth=1.4)
    if val:
        ax.plot(*zip(*val), "o-", label="validation", color="tab:orange", markersize=4)
    ax.legend(loc="upper right")
    _save(fig, path)
    return True


def plot_series(metrics: Metrics, key: str, title: str, ylabel: str, path: Path,
                smooth: bool = False) -> bool:
    """One training-step series (e.g. "lr", "tokens_per_s"); False when the run did not log it.

    `smooth` draws the raw values faintly under their running median (for noisy series).
    """
    from matplotlib.ticker import FuncFormatter

    points = metrics.train(key)
    if not points:
        return False
    fig, ax = _figure(title, ylabel)
    if smooth:
        ax.plot(*zip(*points), color="tab:purple", linewidth=0.7, alpha=0.5)
        ax.plot(*_smoothed(points), color="tab:purple", linewidth=1.4, label="running median")
        ax.legend(loc="best")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
    else:
        ax.plot(*zip(*points), color="tab:purple", linewidth=1.2)
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4))
    _save(fig, path)
    return True


def plot_eval_curves(metrics: Metrics, keys: list[str], path: Path) -> bool:
    """Benchmark scores (eval/<task>/<metric> rows: accuracies, pass@k, the centred CORE) against
    the step."""
    series = [(key, metrics.val(key)) for key in keys]
    series = [(key, points) for key, points in series if points]
    if not series:
        return False
    fig, ax = _figure("Benchmarks during training", "score")
    for key, points in series:
        ax.plot(*zip(*points), "o-", label=key.removeprefix("eval/"), markersize=3, linewidth=1.2)
    lowest = min(v for _, points in series for _, v in points)
    ax.set_ylim(min(0.0, lowest - 0.05), 1)  # the centred CORE can be below 0
    ax.legend(loc="best", fontsize=7)
    _save(fig, path)
    return True
