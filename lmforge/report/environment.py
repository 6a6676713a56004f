"""The machine and library versions a run used, so its numbers can be compared with others."""

from __future__ import annotations

import os
import platform
import sys
from importlib import metadata
from typing import Any

LIBRARIES = ("lmforge", "torch", "numpy", "safetensors", "tiktoken", "matplotlib", "pyarrow")


def machine_info() -> dict[str, Any]:
    """Platform, CPU, cores, Python and library versions; the accelerator when torch is loaded."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "python": sys.version.split()[0],
        "libraries": {name: _version(name) for name in LIBRARIES},
    }
    torch = sys.modules.get("torch")  # only report what this process actually ran with
    if torch is not None:
        info["torch_threads"] = torch.get_num_threads()
        info["accelerator"] = (torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")
    return info


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
