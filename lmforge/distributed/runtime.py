"""Where this process stands: torchrun's environment, the device, the backend, the process group.

torchrun (or any launcher speaking its protocol) sets RANK, WORLD_SIZE, LOCAL_RANK and the
rendezvous variables; a plain `python -m lmforge pretrain` sets none of them and is rank 0 of 1.
NCCL is chosen on GPUs and gloo on CPUs unless `train.dist_backend` names one.
"""

from __future__ import annotations

import gc
import os
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from lmforge.errors import UserError


@dataclass(frozen=True)
class ProcessEnv:
    """This process's coordinates as the launcher gave them."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    launched: bool = False  # started by torchrun (or another launcher setting RANK/WORLD_SIZE)

    @classmethod
    def from_environ(cls) -> ProcessEnv:
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            return cls()
        try:
            return cls(
                rank=int(os.environ["RANK"]),
                world_size=int(os.environ["WORLD_SIZE"]),
                local_rank=int(os.environ.get("LOCAL_RANK", "0")),
                launched=True,
            )
        except ValueError:
            raise UserError(
                f"RANK/WORLD_SIZE/LOCAL_RANK must be integers, got RANK={os.environ['RANK']!r} "
                f"WORLD_SIZE={os.environ['WORLD_SIZE']!r}"
            ) from None


def resolve_device(requested: str, what: str = "train.device") -> torch.device:
    """A device this machine has, from "auto", "cpu", "cuda", "cuda:1" or "mps"; anything else
    (a typo, a GPU this machine lacks) is one clear UserError naming `what`, never a crash later."""
    if requested in ("", "auto"):
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise UserError(f"{what}={requested!r} is not a device: use cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"{what}={requested!r} but this machine has no CUDA GPU (use cpu)")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise UserError(f"{what}={requested!r} but this machine has {count} GPU(s): cuda:0 to cuda:{count - 1}")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise UserError(f"{what}={requested!r} but this machine has no Apple GPU (use cpu)")
    elif device.type != "cpu":
        raise UserError(f"{what}={requested!r}: lmforge runs on cpu, cuda or mps")
    return device


def choose_device(requested: str, env: ProcessEnv) -> torch.device:
    """"auto" is this process's GPU (LOCAL_RANK) when CUDA is available, else the CPU."""
    if requested in ("", "auto"):
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda"):
        resolve_device(requested)
        if requested == "cuda":
            count = torch.cuda.device_count()
            if env.local_rank >= count:
                raise UserError(
                    f"LOCAL_RANK={env.local_rank} but this node has only {count} GPU(s): "
                    f"use --nproc_per_node={count} or fewer"
                )
            return torch.device("cuda", env.local_rank)
    return torch.device(requested)


def choose_backend(requested: str, device: torch.device) -> str:
    """"auto": NCCL for GPUs, gloo for CPUs; NCCL without a GPU is a user error."""
    if requested == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if requested == "nccl" and (device.type != "cuda" or not torch.cuda.is_available()):
        raise UserError(
            "train.dist_backend='nccl' needs CUDA GPUs but this process runs on "
            f"{device.type}: use train.dist_backend=gloo (or auto) on CPU machines"
        )
    return requested


def init_process_group(env: ProcessEnv, backend: str, device: torch.device, timeout_s: float) -> None:
    """Join the job's process group (once). A single process gets a private group of one.

    A group of one lets DDP / FSDP / pipeline code paths run unchanged in a plain process, e.g.
    to load and re-save a sharded checkpoint on one rank.
    """
    if dist.is_initialized():
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    timeout = timedelta(seconds=timeout_s)
    if env.launched:
        dist.init_process_group(backend, rank=env.rank, world_size=env.world_size, timeout=timeout,
                                device_id=device if device.type == "cuda" else None)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)


def shutdown_process_group(quiet_timeout_s: float = 10.0) -> None:
    """Leave the job: destroy the process group, then wait until its C++ threads are idle.

    Call it once every rank is past its last collective (after a barrier) and after dropping the
    wrappers that hold the group (DDP, a pipeline schedule). Both the CLI's torchrun workers and
    the tests' workers end through here, so that a rank exits 0 through normal interpreter exit.

    Why the wait: a gloo worker thread signals a collective complete *before* it releases its
    work item, and releasing the item's tensors (which Python has seen) takes the GIL. Normally
    destroy_process_group joins those threads. But once DTensor ops have run (FSDP2, tensor
    parallel), torch itself keeps the groups alive, so their threads outlive destroy_process_group.
    If one of them asks for the GIL after interpreter finalization began, CPython (3.11-3.13) ends
    it with pthread_exit, whose forced unwind through a noexcept destructor calls std::terminate:
    "terminate called without an active exception", SIGABRT, a failed job after finished work.
    Sleeping with the GIL released until no other thread is running lets every late release
    finish while the interpreter is still whole.
    """
    gc.collect()  # wrappers dropped by the caller may sit in reference cycles
    if dist.is_initialized():
        dist.destroy_process_group()
    gc.collect()
    wait_for_quiet_threads(quiet_timeout_s)


def wait_for_quiet_threads(timeout_s: float, samples: int = 3, interval_s: float = 0.002) -> bool:
    """Sleep (GIL released) until no other thread of this process runs, `samples` checks in a row.

    A thread that still has work - or waits for the GIL, which the sleep frees - is runnable; an
    idle one sleeps on its condition variable or socket. Linux only (it reads /proc); elsewhere,
    and after `timeout_s`, it returns False without waiting further.
    """
    tasks = Path("/proc/self/task")
    if not tasks.is_dir():
        return False
    me = threading.get_native_id()
    deadline = time.monotonic() + timeout_s
    quiet = 0
    while time.monotonic() < deadline:
        time.sleep(interval_s)
        quiet = quiet + 1 if not _running_threads(tasks, me) else 0
        if quiet >= samples:
            return True
    return False


def _running_threads(tasks: Path, me: int) -> list[int]:
    """Native ids of this process's threads, other than `me`, that are running or in disk wait."""
    running = []
    for entry in os.scandir(tasks):
        if int(entry.name) == me:
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:  # the thread ended meanwhile
            continue
        if stat.rsplit(")", 1)[1].split()[0] in ("R", "D"):  # the state follows the name "(...)"
            running.append(int(entry.name))
    return running
