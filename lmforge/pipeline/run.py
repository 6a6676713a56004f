"""`lmforge run`: raw text -> curated data -> tokenizer -> shards -> pre-training -> samples -> report.

Each stage calls the stage's own Python API on the run directory (see layout.py) and is recorded in
RUN/stages.json (records.py). Running the same command again skips every stage whose inputs are
unchanged and whose outputs are intact, continues an interrupted stage (data shards and training
checkpoints are resumable on their own), and reruns a changed stage and everything after it.

The time budget covers the whole invocation: data, tokenizer and shards take what they take,
pre-training gets what is left minus a small reserve for sampling and the report, through
pre-training's own budget mechanism (`train.time_budget`), which sizes the number of steps from the
throughput it measures.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import shutil
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge.atomic import atomic_directory, atomic_write_json, atomic_write_text
from lmforge.config import RunConfig
from lmforge.errors import Interrupted, UserError
from lmforge.hashing import file_sha256
from lmforge.pipeline.layout import RunLayout
from lmforge.pipeline.records import StageRecords, inputs_hash

# Seconds kept free at the end of the budget for sampling and writing the report (measured with
# the tiny preset: 2-4 s on a quiet 2-core machine, 24 s at a load average of 9).
REPORT_RESERVE_S = 30.0
# Pre-training needs at least this long to measure its throughput and take some steps.
MIN_PRETRAIN_S = 30.0
# Prompts of the sample generations in the report (a new document, the configured prompt, and
# openings from each part of the built-in corpus).
BUILTIN_PROMPTS = ["ROMEO:", "And God said", "def "]
SAMPLE_TOKENS = 120
# The tokenizer's bytes per token are measured on (about) this much of the validation split.
VAL_STATS_BYTES = 2_000_000


@dataclass
class Context:
    cfg: RunConfig
    layout: RunLayout
    budget_s: float | None  # the whole invocation's wall-clock budget; None: no budget
    started: float  # time.monotonic() when the invocation started
    progress: bool
    same_inputs: bool = False  # the running stage's last attempt had the same inputs

    def remaining_s(self) -> float | None:
        if self.budget_s is None:
            return None
        return self.budget_s - (time.monotonic() - self.started)


@dataclass(frozen=True)
class Stage:
    name: str
    after: tuple[str, ...]  # the stages whose outputs this one reads
    config: Callable[[Context], Any]  # the part of the config (and options) it depends on
    run: Callable[[Context], None]
    fingerprint: Callable[[Context], str | None]  # of its outputs; None when they are missing


# --------------------------------------------------------------------------------------------
# The stages


def _data_config(ctx: Context) -> Any:
    from lmforge.data.prepare import curate_key

    # curate_key hashes the data config with the source files' sizes and times and the pinned
    # built-in archives, so an edited source file reruns curation too.
    return curate_key(ctx.cfg.data)


def _run_data(ctx: Context) -> None:
    from lmforge.data.prepare import curate

    curate(ctx.cfg.data, ctx.layout.data, progress=ctx.progress)


def _data_fingerprint(ctx: Context) -> str | None:
    stats = ctx.layout.data / "curated" / "stats.json"
    if not stats.is_file():
        return None
    data = json.loads(stats.read_text(encoding="utf-8"))
    return inputs_hash({"key": data.get("key"), "splits": data.get("splits")})


def _run_tokenizer(ctx: Context) -> None:
    from lmforge.data.prepare import curated_texts
    from lmforge.tokenizer import train_tokenizer
    from lmforge.tokenizer.stats import tokenizer_stats

    tc = ctx.cfg.tokenizer
    tok = train_tokenizer(curated_texts(ctx.layout.data, "train"), tc.vocab_size, tc.pattern,
                          tc.special_tokens, workers=ctx.cfg.data.workers, progress=ctx.progress)
    stats = tokenizer_stats(tok, curated_texts(ctx.layout.data, "val"), max_bytes=VAL_STATS_BYTES)
    with atomic_directory(ctx.layout.tokenizer, overwrite=True) as tmp:
        tok.save(tmp)
        atomic_write_json(tmp / "stats.json", stats)


def _tokenizer_fingerprint(ctx: Context) -> str | None:
    path = ctx.layout.tokenizer / "tokenizer.json"
    return file_sha256(path) if path.is_file() else None


def _shards_config(ctx: Context) -> Any:
    data = dataclasses.asdict(ctx.cfg.data)
    data.pop("workers")  # how many processes tokenize does not change the shards
    return data


def _run_shards(ctx: Context) -> None:
    from lmforge.data.prepare import prepare

    # The curation of the data stage is reused (same key); this tokenizes it into shards.
    prepare(ctx.cfg, ctx.layout.data, tokenizer_dir=ctx.layout.tokenizer, progress=ctx.progress)


def _shards_fingerprint(ctx: Context) -> str | None:
    path = ctx.layout.data_manifest
    if not path.is_file():
        return None
    manifest = json.loads(path.read_text(encoding="utf-8"))
    return inputs_hash({"splits": manifest.get("splits"), "tokenizer": manifest.get("tokenizer")})


def _pretrain_config(ctx: Context) -> Any:
    cfg = ctx.cfg
    train = dataclasses.asdict(cfg.train)
    train.pop("time_budget")  # set by the pipeline from what is left of --time-budget
    return {"model": dataclasses.asdict(cfg.model), "train": train,
            "guard": dataclasses.asdict(cfg.guard), "debug": dataclasses.asdict(cfg.debug),
            "time_budget_s": ctx.budget_s}


def _run_pretrain(ctx: Context) -> None:
    from lmforge.report.environment import machine_info
    from lmforge.train.checkpoint import CheckpointManager
    from lmforge.train.pretrain import pretrain

    layout = ctx.layout
    atomic_write_json(layout.environment, machine_info())  # the machine that trains, for the report
    resume_from = CheckpointManager(layout.root, 1).latest() if ctx.same_inputs else None
    if resume_from is None:
        if layout.checkpoints.is_dir() and not ctx.same_inputs:
            print("  the inputs of pre-training changed: starting it afresh (old checkpoints removed)",
                  flush=True)
        _clear_training_outputs(layout)
    cfg = ctx.cfg  # pre-training never changes its config: no copy needed
    remaining = ctx.remaining_s()
    if remaining is not None:
        seconds = remaining - REPORT_RESERVE_S
        if seconds < MIN_PRETRAIN_S:
            raise UserError(
                f"--time-budget: only {max(remaining, 0):.0f}s left for pre-training after the data "
                f"stages; give a larger budget (or rerun: finished stages are skipped)")
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, time_budget=f"{seconds:.0f}s"))
    if resume_from is not None:
        print(f"  resuming pre-training from {resume_from.name}", flush=True)
    result = pretrain(cfg, layout.data, layout.root, resume_from=resume_from)
    if result.stopped_by_signal:  # checkpointed; the stage stays unfinished and resumes next time
        raise Interrupted(result.signal or signal.SIGINT, saved=True)


def _clear_training_outputs(layout: RunLayout) -> None:
    """Pre-training starts afresh: the checkpoints and metrics of other inputs must go."""
    shutil.rmtree(layout.checkpoints, ignore_errors=True)
    shutil.rmtree(layout.tensorboard, ignore_errors=True)
    layout.metrics.unlink(missing_ok=True)


def _pretrain_fingerprint(ctx: Context) -> str | None:
    from lmforge.train.checkpoint import CheckpointManager

    latest = CheckpointManager(ctx.layout.root, 1).latest()
    if latest is None:
        return None
    return inputs_hash({"checkpoint": latest.name, "weights": file_sha256(latest / "model.safetensors")})


def _sample_config(ctx: Context) -> Any:
    return {"prompts": sample_prompts(ctx.cfg), "tokens": SAMPLE_TOKENS, "seed": ctx.cfg.train.seed}


def sample_prompts(cfg: RunConfig) -> list[str]:
    prompts = ["", cfg.train.sample_prompt]
    if "builtin:default" in cfg.data.sources:
        prompts += BUILTIN_PROMPTS
    return prompts


def _run_sample(ctx: Context) -> None:
    from lmforge.train.checkpoint import CheckpointManager

    checkpoint = CheckpointManager(ctx.layout.root, 1).latest()
    if checkpoint is None:
        raise UserError(f"no complete checkpoint under {ctx.layout.checkpoints} to sample from")
    samples = generate_samples(checkpoint, sample_prompts(ctx.cfg), SAMPLE_TOKENS, ctx.cfg.train.seed)
    atomic_write_json(ctx.layout.samples, samples)


def generate_samples(checkpoint: Path, prompts: list[str], max_new_tokens: int, seed: int,
                     temperature: float = 0.8, top_k: int = 50) -> list[dict[str, Any]]:
    """One seeded continuation per prompt ("" starts a new document) from a checkpoint."""
    from lmforge.checkpoint import load_model
    from lmforge.engine import generate_text
    from lmforge.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(checkpoint / "tokenizer")
    model = load_model(checkpoint)
    samples = []
    for i, prompt in enumerate(prompts):
        generated = generate_text(model, tokenizer, prompt, max_new_tokens, temperature=temperature,
                                  top_k=top_k, seed=seed + i)
        samples.append({"prompt": prompt, "text": prompt + generated.text,
                        "tokens": len(generated.token_ids), "checkpoint": checkpoint.name,
                        "temperature": temperature, "top_k": top_k})
    return samples


def _sample_fingerprint(ctx: Context) -> str | None:
    return file_sha256(ctx.layout.samples) if ctx.layout.samples.is_file() else None


def _run_report(ctx: Context) -> None:
    from lmforge.report import build_report

    build_report(ctx.layout.root)


def _report_fingerprint(ctx: Context) -> str | None:
    path = ctx.layout.report / "report.md"
    return file_sha256(path) if path.is_file() and (ctx.layout.report / "report.pdf").is_file() else None


STAGES: list[Stage] = [
    Stage("data", (), _data_config, _run_data, _data_fingerprint),
    Stage("tokenizer", ("data",), lambda ctx: dataclasses.asdict(ctx.cfg.tokenizer), _run_tokenizer,
          _tokenizer_fingerprint),
    Stage("shards", ("data", "tokenizer"), _shards_config, _run_shards, _shards_fingerprint),
    Stage("pretrain", ("shards",), _pretrain_config, _run_pretrain, _pretrain_fingerprint),
    Stage("sample", ("pretrain",), _sample_config, _run_sample, _sample_fingerprint),
    Stage("report", ("data", "tokenizer", "shards", "pretrain", "sample"), lambda ctx: None,
          _run_report, _report_fingerprint),
]


# --------------------------------------------------------------------------------------------
# The driver


def run_pipeline(cfg: RunConfig, out: str | Path, budget_s: float | None,
                 progress: bool | None = None, log: Callable[[str], None] | None = None) -> Path:
    """Run (or continue) every stage in `out`; returns the report directory."""
    ctx = Context(cfg, RunLayout(Path(out)), budget_s, time.monotonic(),
                  sys.stderr.isatty() if progress is None else progress)
    layout = ctx.layout
    layout.root.mkdir(parents=True, exist_ok=True)
    layout.logs.mkdir(exist_ok=True)
    show = log or (lambda line: print(line, flush=True))

    def say(line: str) -> None:
        """Show a progress line and keep it, timestamped, in logs/pipeline.log."""
        show(line)
        with open(layout.pipeline_log, "a", encoding="utf-8") as f:
            f.write(f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M:%S} {line}\n")

    atomic_write_text(layout.config, cfg.to_toml())
    records = StageRecords(layout.stages)
    budget = f"time budget {budget_s / 60:.1f} min" if budget_s else "no time budget"
    say(f"lmforge run: {layout.root} ({budget}; {len(STAGES)} stages)")
    for number, stage in enumerate(STAGES, 1):
        inputs = {"config": stage.config(ctx),
                  "after": {name: _upstream(records, name) for name in stage.after}}
        digest = inputs_hash(inputs)
        head = f"[{number}/{len(STAGES)}] {stage.name:<9}"
        record = records.get(stage.name)
        if records.is_current(stage.name, digest) and stage.fingerprint(ctx) == record.get("outputs"):
            say(f"{head} skipped: unchanged since {record.get('finished_at', '?')}")
            continue
        # Same inputs as the last attempt: what that attempt left may be continued.
        ctx.same_inputs = bool(record and record.get("inputs_hash") == digest)
        unfinished = ctx.same_inputs and record.get("status") == "running"
        say(f"{head} running" + (" (continuing an unfinished attempt)" if unfinished else ""))
        records.started(stage.name, digest, inputs)
        start = time.monotonic()
        stage.run(ctx)
        seconds = time.monotonic() - start
        outputs = stage.fingerprint(ctx)
        if outputs is None:  # pragma: no cover - a stage that returned without its outputs is a bug
            raise RuntimeError(f"stage {stage.name} finished without writing its outputs")
        records.completed(stage.name, outputs, seconds)
        say(f"{head} done in {seconds:.1f}s")
    total = time.monotonic() - ctx.started
    say(f"finished in {total / 60:.1f} min")
    return layout.report


def _upstream(records: StageRecords, name: str) -> dict[str, Any]:
    """What a downstream stage depends on of stage `name`: its inputs and its outputs."""
    record = records.get(name) or {}
    return {"inputs_hash": record.get("inputs_hash"), "outputs": record.get("outputs")}
