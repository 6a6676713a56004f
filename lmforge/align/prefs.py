"""`builtin:prefs`: preference pairs sampled from the policy itself, judged by the task checkers.

For each verifiable `builtin:chat` prompt (the train split for training pairs, the test split for
held-out ones) the engine samples `dpo.prefs_samples` answers at `dpo.prefs_temperature`, plus
the greedy answer with `dpo.prefs_greedy`; the task's `check` marks each right or wrong, and up to
`dpo.prefs_pairs` (right, wrong) pairs are made, the greedy answer's first: the answer the model
gives at temperature 0 (in evaluation, in a deterministic chat) is the mistake most worth
correcting, and sampled answers alone rarely contain it. A prompt whose answers are all right or all wrong teaches nothing and is skipped (counted).
No human labels: the pairs are on-policy, the answers the model would give itself.

Deterministic for a seed (each prompt's samples have their own seeds). The pairs are cached in the
run directory (RUN_DIR/prefs/: train.jsonl, val.jsonl, summary.json), keyed by the base, the seed
and the settings, so a resumed or restarted run reuses them instead of sampling again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lmforge.align.config import DpoConfig
from lmforge.align.pairs import Pair, PairData, read_pairs, write_pairs
from lmforge.atomic import atomic_write_json
from lmforge.errors import UserError

PREFS_DIR = "prefs"  # RUN_DIR/prefs/


@dataclass
class PrefsStats:
    """How the prompts of one split fared."""

    prompts: int = 0
    pairs: int = 0
    all_right: int = 0  # skipped: no wrong answer to contrast
    all_wrong: int = 0  # skipped: no right answer
    too_long: int = 0  # skipped: the prompt leaves no room to answer

    def describe(self, split: str) -> str:
        return (f"builtin:prefs {split}: {self.pairs} pairs from {self.prompts} prompts; skipped "
                f"{self.all_right} all right, {self.all_wrong} all wrong, {self.too_long} too long")


def verifiable_mixture(tasks: dict, weights: Sequence[str] = ()) -> dict[str, float]:
    """The task shares of builtin:prefs' prompts: `weights` (dpo.prefs_tasks, `TASK[:WEIGHT]`), or
    when empty builtin:chat's shares, restricted to tasks whose answers can be checked (a task
    builtin:chat does not mix gets the share 1 before normalising)."""
    from lmforge.tasks import MIXTURE

    if weights:
        shares = {}
        for item in weights:
            name, _, weight = item.partition(":")
            if name not in tasks or not tasks[name].verifiable:
                known = ", ".join(n for n, t in tasks.items() if t.verifiable)
                raise UserError(f"dpo.prefs_tasks: {name!r} is not a verifiable task; the tasks are {known}")
            shares[name] = float(weight or 1.0)
    else:
        shares = {name: MIXTURE.get(name, 1.0) for name, task in tasks.items() if task.verifiable}
    total = sum(shares.values())
    return {name: share / total for name, share in shares.items()}


def sample_pairs(model, tokenizer, examples: Sequence, tasks: dict, cfg: DpoConfig,
                 seed: int) -> tuple[list[Pair], PrefsStats]:
    """Sample answers to every example's prompt with the engine and pair right with wrong ones."""
    from lmforge.chat import render_prompt
    from lmforge.engine import Engine, SamplingParams

    stats = PrefsStats(prompts=len(examples))
    engine = Engine(model, tokenizer, max_batch=max(cfg.prefs_samples, 64))
    context = model.cfg.max_seq_len
    requests = []  # per example: (sampled, greedy) requests, or None when it does not fit
    for i, example in enumerate(examples):
        ids = render_prompt(tokenizer, example.prompt)
        room = min(cfg.prefs_max_tokens, context - len(ids))
        if room < 1:
            stats.too_long += 1
            requests.append(None)
            continue
        # Seeds apart by prefs_samples: the engine seeds sample k of a request with seed + k.
        params = SamplingParams(max_tokens=room, temperature=cfg.prefs_temperature, n=cfg.prefs_samples,
                                seed=seed * 1_000_003 + i * cfg.prefs_samples)
        greedy = (engine.submit(ids, SamplingParams(max_tokens=room, temperature=0.0), stream=False)
                  if cfg.prefs_greedy else None)
        requests.append((engine.submit(ids, params, stream=False), greedy))
    while engine.step():
        pass
    pairs = []
    for example, request in zip(examples, requests, strict=True):
        if request is None:
            continue
        task = tasks[example.task]
        completions = [c for r in reversed(request) if r is not None for c in r.result()]  # greedy first
        answers = list(dict.fromkeys(c.text.strip() for c in completions))  # distinct, in order
        right = [a for a in answers if task.check(example, a)]
        wrong = [a for a in answers if a not in right]
        if cfg.prefs_strict:  # a right answer with wrong working is neither chosen nor rejected
            right = [a for a in right if task.check_work(example, a)]
        if not wrong:
            stats.all_right += 1
            continue
        if not right:
            stats.all_wrong += 1
            continue
        for good, bad in list(zip(right, wrong))[: cfg.prefs_pairs]:
            pairs.append(Pair(example.prompt, [{"role": "assistant", "content": good}],
                              [{"role": "assistant", "content": bad}]))
    stats.pairs = len(pairs)
    return pairs, stats


def make_prefs(model, tokenizer, cfg: DpoConfig, seed: int, tasks: dict | None = None) -> PairData:
    """builtin:prefs for `model`: train pairs from the train split, held-out ones from the test split."""
    from lmforge.tasks import builtin_chat, make_tasks

    tasks = tasks if tasks is not None else make_tasks()
    mixture = verifiable_mixture(tasks, cfg.prefs_tasks)
    was_training = model.training
    data = PairData()
    for split, n in (("train", cfg.prefs_prompts), ("test", cfg.prefs_val_prompts)):
        if not n:
            continue
        examples = builtin_chat(split, seed, n, tasks=tasks, mixture=mixture)
        pairs, stats = sample_pairs(model, tokenizer, examples, tasks, cfg, seed)
        (data.train if split == "train" else data.val).extend(pairs)
        data.notes.append(stats.describe(split))
    model.train(was_training)
    if not data.train:
        raise UserError(f"{data.notes[0]}: no pair to learn from; sample more answers per prompt "
                        "(dpo.prefs_samples), more prompts (dpo.prefs_prompts), or fine-tune the model first")
    return data


def prefs_fingerprint(base_sha256: str, cfg: DpoConfig, seed: int) -> str:
    """What the cached pairs depend on: the policy's weights, the seed and the prefs_* settings."""
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k.startswith("prefs_")}
    payload = json.dumps({"base": base_sha256, "seed": seed, **settings}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def cached_prefs(run_dir: Path, fingerprint: str, make) -> PairData:
    """The pairs cached in RUN_DIR/prefs/ when they were made for `fingerprint`; else `make()`
    them and cache them. (Read or written on the main rank; other ranks read after a barrier.)"""
    directory = Path(run_dir) / PREFS_DIR
    summary = directory / "summary.json"
    if summary.is_file():
        meta = json.loads(summary.read_text(encoding="utf-8"))
        if meta.get("fingerprint") == fingerprint:
            val = directory / "val.jsonl"
            return PairData(read_pairs(directory / "train.jsonl"),
                            read_pairs(val) if val.stat().st_size else [],
                            [*meta["notes"], f"builtin:prefs: reused the pairs cached in {directory}"])
    data = make()
    directory.mkdir(parents=True, exist_ok=True)
    write_pairs(directory / "train.jsonl", data.train)
    write_pairs(directory / "val.jsonl", data.val)
    atomic_write_json(summary, {"fingerprint": fingerprint, "train": len(data.train), "val": len(data.val),
                                "notes": data.notes})  # written last: the pairs are complete
    return data


__all__ = ["PREFS_DIR", "PrefsStats", "cached_prefs", "make_prefs", "prefs_fingerprint", "sample_pairs",
           "verifiable_mixture"]
