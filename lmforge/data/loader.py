"""`TokenLoader`: batches of (input, target) windows from memory-mapped token shards.

The split's shards are cut into non-overlapping windows of `seq_len + 1` tokens (targets are the
inputs shifted by one; a window never crosses a shard boundary, so at most `seq_len` tokens per
shard go unused). An epoch visits every window once, in shard order or in a seeded permutation
that differs per epoch.

Batches are defined globally: each call takes the next `batch_size` windows of the epoch's order
(an epoch ends when fewer than `batch_size` are left), and rank r of `world_size` keeps rows
[r * B / W, (r + 1) * B / W). So the global batch of a step is the same for any world size, and
two ranks never get the same window in an epoch. The state is just (epoch, windows consumed), so
a run resumed with `load_state_dict` sees exactly the batches it would have seen, on any world size.

On CUDA a background thread prepares the next batches in pinned memory and copies them with
`non_blocking=True`, overlapping data loading with compute (`prefetch` forces it on or off).
"""

from __future__ import annotations

import json
import queue
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmforge.data.shards import inside_root, open_shard
from lmforge.errors import UserError

STATE_VERSION = 1
_PREFETCH = 2  # batches prepared ahead on CUDA


class TokenLoader:
    """Global batches of `(x, y)` LongTensors, each (batch_size // world_size, seq_len)."""

    def __init__(
        self,
        shards_dir: str | Path,
        split: str = "train",
        seq_len: int = 256,
        batch_size: int = 16,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        device: str | torch.device = "cpu",
        verify: bool = True,
        prefetch: bool | None = None,
    ):
        if seq_len <= 0 or batch_size <= 0:
            raise UserError(f"seq_len={seq_len} and batch_size={batch_size} must be > 0")
        if not 0 <= rank < world_size:
            raise UserError(f"rank={rank} must be in [0, world_size={world_size})")
        if batch_size % world_size:
            raise UserError(f"the global batch_size={batch_size} must be divisible by "
                            f"world_size={world_size} so every rank gets the same number of rows")
        self.root, self.split = Path(shards_dir), split
        self.seq_len, self.batch_size, self.shuffle, self.seed = seq_len, batch_size, shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.device = torch.device(device)
        self.prefetch = self.device.type == "cuda" if prefetch is None else prefetch
        self._pin = self.device.type == "cuda"
        self.shards = [open_shard(p, verify=verify) for p in self._shard_paths()]
        per_shard = np.array([max(0, (len(s) - 1) // seq_len) for s in self.shards], dtype=np.int64)
        self._first_window = np.concatenate([[0], np.cumsum(per_shard)])
        self.windows_per_epoch = int(self._first_window[-1])
        if self.windows_per_epoch < batch_size:
            total = sum(len(s) for s in self.shards)
            raise UserError(
                f"{self.root}: the {split} split has {total:,} tokens = {self.windows_per_epoch} "
                f"windows of seq_len {seq_len}, fewer than one global batch of {batch_size}; "
                "use more data, a smaller batch or a shorter sequence"
            )
        self._cursor = (0, 0)  # (epoch, windows consumed in it) of the next batch to produce
        self._delivered = (0, 0)  # the same, as seen by the caller
        self._orders: dict[int, np.ndarray] = {}
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue | None = None
        self._stop = threading.Event()

    def _shard_paths(self) -> list[Path]:
        manifest = self.root / "manifest.json"
        if manifest.is_file():
            try:
                info = json.loads(manifest.read_text(encoding="utf-8"))["splits"][self.split]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise UserError(f"{manifest}: no split {self.split!r} in this manifest") from None
            paths = [inside_root(self.root, s["file"], str(manifest)) for s in info["shards"]]
        else:
            paths = sorted(self.root.glob(f"{self.split}_*.bin"))
        if not paths:
            raise UserError(f"{self.root}: no {self.split} shards; make them with `lmforge data prepare`")
        return paths

    # -- order and state ------------------------------------------------------------------------

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Window indices of an epoch in visiting order."""
        if epoch not in self._orders:
            if self.shuffle:
                order = np.random.default_rng([self.seed, epoch]).permutation(self.windows_per_epoch)
            else:
                order = np.arange(self.windows_per_epoch)
            self._orders = {epoch: order}  # keep only the current epoch's permutation
        return self._orders[epoch]

    def _next_global_windows(self) -> np.ndarray:
        epoch, position = self._cursor
        if position + self.batch_size > self.windows_per_epoch:  # too few left: next epoch
            epoch, position = epoch + 1, 0
        windows = self.epoch_order(epoch)[position : position + self.batch_size]
        self._cursor = (epoch, position + self.batch_size)
        return windows

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable position: global windows consumed, so any world size can resume."""
        epoch, position = self._delivered
        return {"version": STATE_VERSION, "split": self.split, "seq_len": self.seq_len,
                "batch_size": self.batch_size, "shuffle": self.shuffle, "seed": self.seed,
                "windows_per_epoch": self.windows_per_epoch, "epoch": epoch, "position": position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("seq_len", "batch_size", "shuffle", "seed", "windows_per_epoch"):
            if state.get(key) != getattr(self, key):
                raise UserError(f"cannot resume the data loader: {key} was {state.get(key)!r} "
                                f"and is now {getattr(self, key)!r}")
        self._stop_prefetch()
        self._cursor = self._delivered = (int(state["epoch"]), int(state["position"]))

    @property
    def epoch(self) -> int:
        return self._delivered[0]

    # -- batches ----------------------------------------------------------------------------------

    def _rows(self, windows: np.ndarray) -> np.ndarray:
        """This rank's rows of the global batch as an int64 (rows, seq_len + 1) array."""
        share = self.batch_size // self.world_size
        return self.windows(windows[self.rank * share : (self.rank + 1) * share])

    def windows(self, indices: np.ndarray) -> np.ndarray:
        """Windows of the split by global index (0 .. windows_per_epoch - 1), as an int64
        (len(indices), seq_len + 1) array."""
        indices = np.asarray(indices, dtype=np.int64)
        shard_of = np.searchsorted(self._first_window, indices, side="right") - 1
        out = np.empty((len(indices), self.seq_len + 1), dtype=np.int64)
        for row, (w, s) in enumerate(zip(indices.tolist(), shard_of.tolist())):
            start = (w - int(self._first_window[s])) * self.seq_len
            out[row] = self.shards[s][start : start + self.seq_len + 1]
        return out

    def _produce(self, pin: bool) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        rows = torch.from_numpy(self._rows(self._next_global_windows()))
        x, y = rows[:, :-1].contiguous(), rows[:, 1:].contiguous()
        if pin:
            x, y = x.pin_memory(), y.pin_memory()
        return x, y, self._cursor

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's share of the next global batch, on `device`."""
        if not self.prefetch:
            x, y, self._delivered = self._produce(pin=self._pin)
        else:
            if self._thread is None:
                self._start_prefetch()
            assert self._queue is not None
            item = self._queue.get()
            if isinstance(item, BaseException):
                raise item
            x, y, self._delivered = item
        return (x.to(self.device, non_blocking=self._pin), y.to(self.device, non_blocking=self._pin))

    def __iter__(self):
        while True:
            yield self.next_batch()

    # -- prefetch thread (CUDA) -----------------------------------------------------------------

    def _start_prefetch(self) -> None:
        self._stop.clear()
        self._queue = queue.Queue(maxsize=_PREFETCH)
        self._thread = threading.Thread(target=self._prefetch_loop, daemon=True,
                                        name=f"TokenLoader-{self.split}")
        self._thread.start()

    def _prefetch_loop(self) -> None:
        assert self._queue is not None
        try:
            while not self._stop.is_set():
                item = self._produce(pin=self._pin)
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as e:  # surfaced in next_batch rather than lost in the thread
            self._queue.put(e)

    def _stop_prefetch(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = self._queue = None
            self._cursor = self._delivered  # batches prepared but not delivered are made again

    def close(self) -> None:
        self._stop_prefetch()

    def __del__(self) -> None:
        if getattr(self, "_thread", None) is not None:  # __init__ may have failed early
            self._stop_prefetch()
