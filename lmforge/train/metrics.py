"""Watching a run: metrics.jsonl, TensorBoard events and a progress bar.

Every record is one JSON object on one line of RUN_DIR/metrics.jsonl, flushed as it is written so
a crashed run keeps its history. Training lines have step, tokens, loss, lr, grad_norm, tokens_per_s,
mfu (when the accelerator's peak is known) and memory_gb; evaluation lines step, val_loss, val_bpb;
events (resume, rollback, budget, stop) an "event" field; samples a "sample" field. Only the main
rank writes. When a run resumes at step S, lines of later steps (from the attempt that died) are
dropped first, so the file reads as one clean run.
"""

from __future__ import annotations

import json
import math
import resource
import sys
from pathlib import Path
from typing import Any

import torch

from lmforge.atomic import atomic_write_text

# Dense bf16 peak FLOP/s per device (vendor datasheets; SXM parts). Used for MFU only.
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 70e12,
    "RTX 4090": 165e12,
}


def peak_flops(device: torch.device) -> float | None:
    """bf16 dense peak FLOP/s of this device, or None where unknown (e.g. a CPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_FLOPS.items():  # "H100 PCIe" is tested before "H100"
        if key in name:
            return value
    return None


def memory_gb(device: torch.device) -> float:
    """Peak memory of this process: allocated GPU memory, or resident CPU memory."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return rss_kb / 2**20


class MetricsLogger:
    def __init__(self, run_dir: Path, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self._file = None
        self._tb = None
        self._bar = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(Path(run_dir) / "tb"))

    def truncate_after(self, step: int) -> None:
        """Drop records of steps after `step` (and torn lines) left by an attempt that died."""
        if not self.enabled or not self.path.exists():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and record.get("step", 0) <= step:
                kept.append(line)
        atomic_write_text(self.path, "".join(f"{line}\n" for line in kept))

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self._file is None:
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - kept open for the run
        clean = {k: _json_value(v) for k, v in record.items()}
        self._file.write(json.dumps(clean) + "\n")
        self._file.flush()
        if self._tb is not None and "step" in record:
            for key, value in record.items():
                if key == "step" or isinstance(value, bool):
                    continue
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(_tb_tag(key), value, record["step"])
                elif key == "sample":
                    self._tb.add_text("sample", str(value), record["step"])

    def start_bar(self, total: int, initial: int) -> None:
        if not self.enabled:
            return
        from tqdm.auto import tqdm

        self._bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True,
                         disable=None, file=sys.stderr)

    def update_bar(self, step: int, total: int, loss: float, tokens_per_s: float) -> None:
        if self._bar is None:
            return
        self._bar.total = total
        self._bar.update(step - self._bar.n)
        self._bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)

    def write(self, message: str) -> None:
        """A line for the person watching (above the bar, if there is one)."""
        if not self.enabled:
            return
        if self._bar is not None and not self._bar.disable:
            self._bar.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()


def _json_value(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep the line valid
    return value


def _tb_tag(key: str) -> str:
    return f"val/{key[4:]}" if key.startswith("val_") else f"train/{key}"
