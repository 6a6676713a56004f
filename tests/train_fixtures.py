"""Shared helpers of the training tests: a tiny corpus made into shards by the data stage, the
`lmforge` command in a subprocess, and the SIGKILL-and-resume harness of the fine-tuning stages."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from lmforge.config import RunConfig, load_config

SUBJECTS = ["the cat", "a dog", "the old man", "my sister", "the bird", "a farmer", "the child"]
VERBS = ["sees", "likes", "follows", "finds", "paints", "carries", "watches"]
OBJECTS = ["the red ball", "a small house", "the river", "an apple", "the moon", "a green hat"]
PLACES = ["in the garden", "near the sea", "at night", "every morning", "under the tree"]


def synthetic_documents(n_docs: int, seed: int = 0) -> list[str]:
    """Documents of simple sentences from a tiny grammar: easy to learn, not trivial."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        sentences = [
            f"{rng.choice(SUBJECTS).capitalize()} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(PLACES)}."
            for _ in range(rng.randint(12, 20))
        ]
        docs.append(" ".join(sentences))
    return docs


def make_shards(root: Path, n_docs: int = 160) -> Path:
    """Run the real data stage over the synthetic corpus; returns the shards directory."""
    from lmforge.data.prepare import prepare

    src = root / "corpus.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in synthetic_documents(n_docs)))
    cfg = load_config(overrides=[
        f"data.sources=[{json.dumps(str(src))}]", "data.workers=1", "data.val_fraction=0.1",
        "tokenizer.vocab_size=300", "data.shard_tokens=20000", "data.dedup.near=false",
    ])
    out = root / "shards"
    prepare(cfg, out, progress=False)
    return out


# d_model 32, 2 layers, vocab 300, seq 32: a step takes milliseconds on a CPU.
TINY = [
    "model.vocab_size=300", "model.d_model=32", "model.n_layers=2", "model.n_heads=2",
    "model.n_kv_heads=1", "model.max_seq_len=32", "train.batch_size=4", "train.lr=3e-3",
    "train.warmup_steps=4", "train.eval_every=5", "train.eval_batches=2",
    "train.checkpoint_every=5", "train.max_steps=12", "train.tensorboard=false", "train.device=cpu",
]


def tiny_config(*overrides: str) -> RunConfig:
    return load_config(overrides=[*TINY, *overrides])


def set_args(*overrides: str) -> list[str]:
    """The same overrides as command-line flags."""
    return [a for o in (*TINY, *overrides) for a in ("--set", o)]


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path) -> dict[int, float]:
    """Training loss per step (the newest line of a step wins, as after a rollback)."""
    out = {}
    for r in read_metrics(run_dir):
        if "loss" in r and "event" not in r:
            out[r["step"]] = r["loss"]
    return out


# The environment of `python -m lmforge` subprocesses: this checkout's lmforge, one thread.
LMFORGE_ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1",
               "PYTHONUNBUFFERED": "1"}  # a SIGKILLed run has written what it printed


def run_lmforge(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """`python -m lmforge ARGS`; with `check`, a non-zero exit fails with its output."""
    proc = subprocess.run([sys.executable, "-m", "lmforge", *args], capture_output=True, text=True,
                          env=LMFORGE_ENV, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def flags(*overrides: str) -> list[str]:
    """Overrides as --set flags (nothing added, unlike set_args)."""
    return [a for o in overrides for a in ("--set", o)]


def kill_and_resume(args: list[str], overrides: list[str], root: Path, at: int = 7,
                    before_resume: Callable[[Path], object] = lambda run: None,
                    ) -> tuple[subprocess.CompletedProcess, Path, Path]:
    """A stage command (`args`: command, --checkpoint, --data ...) run three ways: uninterrupted into
    root/reference; into root/killed, SIGKILLed at step `at` (then `before_resume(killed run)`);
    then resumed there with --resume. Returns the uninterrupted run's process and the two run
    directories, to compare."""
    reference, killed_run = root / "reference", root / "killed"
    done = run_lmforge(*args, "--out", str(reference), *flags(*overrides))
    killed = run_lmforge(*args, "--out", str(killed_run), *flags(*overrides, f"debug.inject=sigkill@{at}"),
                         check=False)
    assert killed.returncode == -9, killed.stderr
    before_resume(killed_run)
    run_lmforge(*args, "--out", str(killed_run), "--resume")
    return done, reference, killed_run


def kept_for_backward(output, leave_out=()) -> int:
    """Bytes of the distinct storages the autograd graph behind `output` keeps for backward,
    read off the graph's nodes (their `_saved_*` fields; a custom Function's saved_tensors), each
    storage once, those of the `leave_out` tensors (e.g. the parameters) not counted. Unlike
    saved-tensor hooks this observes the graph without changing how it is built, and memory
    released after forward (a storage resized to 0) counts as 0."""
    import torch

    left_out = {t.untyped_storage().data_ptr() for t in leave_out}
    kept: dict[int, int] = {}
    nodes, seen = [output.grad_fn], set()
    while nodes:
        node = nodes.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        values = [getattr(node, name) for name in dir(node) if name.startswith("_saved_")]
        values += list(getattr(node, "saved_tensors", ()) or ())
        for value in values:
            for t in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in left_out:
                    kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        nodes.extend(next_node for next_node, _ in node.next_functions)
    return sum(kept.values())
