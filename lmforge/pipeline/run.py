"""`lmforge run`: the whole lifecycle in one command.

    data -> tokenizer -> shards -> pretrain -> sft -> align -> eval -> sample -> chat -> export -> report

Each stage calls the stage's own Python API on the run directory (see layout.py; the stages after
pre-training are in posttrain.py) and is recorded in RUN/stages.json (records.py). Running the same
command again skips every stage whose inputs are unchanged and whose outputs are intact, continues
an interrupted stage (data shards and training checkpoints are resumable on their own), and reruns a
changed stage and everything after it. A rerun never loses a finished stage's outputs: a stage
redone on changed inputs first moves what its last attempt left to RUN/previous/STAGE-TIMESTAMP/
(with that attempt's record and config), where it replaces the stage's older entry. `--until STAGE` runs the stages up to STAGE only.

The time budget covers the whole invocation and is split as stage.py describes: the training
stages share what the others leave, by `run.*_share`; a stage redone or continued alone gets its
share, not the time of the stages finished before. It is checked before anything is touched: a
budget too small for the stages left is refused with the smallest that works.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lmforge.atomic import atomic_directory, atomic_write_json, atomic_write_text
from lmforge.config import RunConfig
from lmforge.errors import Interrupted, UserError
from lmforge.hashing import file_sha256
from lmforge.pipeline import posttrain
from lmforge.pipeline.layout import RunLayout
from lmforge.pipeline.records import StageRecords, inputs_hash
from lmforge.pipeline.stage import DRIVER_RESERVE_S, FIXED_COST_S, Context, Stage
from lmforge.runlock import LOCK_NAME

# Prompts of the sample generations in the report (a new document, the configured prompt, and
# openings from each part of the built-in corpus).
BUILTIN_PROMPTS = ["ROMEO:", "And God said", "def "]
SAMPLE_TOKENS = 120
# In each RUN/previous/ entry: which stage, when, why, and its record (stages.json) at the time.
PREVIOUS_NOTE = "previous.json"
# The tokenizer's bytes per token are measured on (about) this much of the validation split.
VAL_STATS_BYTES = 2_000_000


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
    tok = train_tokenizer(curated_texts(ctx.layout.data, "train"), tc.vocab_size, tc.split_pattern,
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
            "time_budget_s": ctx.budget_s, "share": cfg.run.pretrain_share}


def _run_pretrain(ctx: Context) -> None:
    from lmforge.report.environment import machine_info
    from lmforge.train.pretrain import pretrain

    layout = ctx.layout
    atomic_write_json(layout.environment, machine_info())  # the machine that trains, for the report
    resume_from = posttrain.latest_checkpoint(layout.root) if ctx.same_inputs else None
    if resume_from is None:
        # Other inputs' outputs were moved aside by the driver; these are an earlier attempt's on
        # the same inputs that never reached a checkpoint.
        _clear_training_outputs(layout)
    cfg = dataclasses.replace(ctx.cfg, train=dataclasses.replace(ctx.cfg.train))  # run.py's own copy
    seconds = posttrain.budget_stage(ctx, "pretrain", cfg, resume_from)
    if resume_from is not None:
        print(f"  resuming pre-training from {resume_from.name}", flush=True)
    result = pretrain(cfg, layout.data, layout.root, resume_from=resume_from, time_budget_s=seconds)
    if result.stopped_by_signal:  # checkpointed; the stage stays unfinished and resumes next time
        raise Interrupted(result.signal or signal.SIGINT, saved=True)


def _pretrain_outputs(layout: RunLayout) -> list[Path]:
    return [layout.checkpoints, layout.metrics, layout.tensorboard, layout.environment]


def _clear_training_outputs(layout: RunLayout) -> None:
    """Pre-training starts afresh on the inputs of an attempt that left no checkpoint."""
    shutil.rmtree(layout.checkpoints, ignore_errors=True)
    shutil.rmtree(layout.tensorboard, ignore_errors=True)
    layout.metrics.unlink(missing_ok=True)


def _sample_config(ctx: Context) -> Any:
    return {"prompts": sample_prompts(ctx.cfg), "tokens": SAMPLE_TOKENS, "seed": ctx.cfg.train.seed}


def sample_prompts(cfg: RunConfig) -> list[str]:
    prompts = ["", cfg.train.sample_prompt]
    if "builtin:default" in cfg.data.sources:
        prompts += BUILTIN_PROMPTS
    return prompts


def _run_sample(ctx: Context) -> None:
    checkpoint = posttrain.pretrained(ctx)
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


def _shards_outputs(layout: RunLayout) -> list[Path]:
    data = layout.data
    shards = [p for split in ("train", "val") for p in sorted(data.glob(f"{split}_*.bin"))]
    return [layout.data_manifest, data / "tokenizer", *sorted(data.glob("progress_*.json")), *shards]


_TRAINING = ("pretrain", "sft", "align")
STAGES: list[Stage] = [
    Stage("data", (), _data_config, _run_data, _data_fingerprint,
          lambda layout: [layout.data / "curated"]),
    Stage("tokenizer", ("data",), lambda ctx: dataclasses.asdict(ctx.cfg.tokenizer), _run_tokenizer,
          _tokenizer_fingerprint, lambda layout: [layout.tokenizer]),
    Stage("shards", ("data", "tokenizer"), _shards_config, _run_shards, _shards_fingerprint,
          _shards_outputs),
    Stage("pretrain", ("shards",), _pretrain_config, _run_pretrain,
          lambda ctx: posttrain.checkpoint_fingerprint(ctx.layout.root), _pretrain_outputs),
    Stage("sft", ("pretrain",), posttrain.sft_inputs, posttrain.run_sft,
          lambda ctx: posttrain.checkpoint_fingerprint(ctx.layout.sft), lambda layout: [layout.sft]),
    Stage("align", ("sft",), posttrain.align_inputs, posttrain.run_align, posttrain.align_fingerprint,
          lambda layout: [layout.align]),
    Stage("eval", ("shards", *_TRAINING), posttrain.eval_inputs, posttrain.run_eval,
          posttrain.eval_fingerprint, lambda layout: [layout.eval_results.parent]),
    Stage("sample", ("pretrain",), _sample_config, _run_sample, _sample_fingerprint,
          lambda layout: [layout.samples]),
    Stage("chat", ("sft", "align"), posttrain.chat_inputs, posttrain.run_chat,
          posttrain.chat_fingerprint, lambda layout: [layout.chat]),
    Stage("export", ("sft", "align"), lambda ctx: {"formats": ctx.cfg.run.export},
          posttrain.run_export, posttrain.export_fingerprint, lambda layout: [layout.export]),
    # The report is regenerated from the artefacts (and leaves the user's files in report/ alone).
    Stage("report", ("data", "tokenizer", "shards", *_TRAINING, "eval", "sample", "chat", "export"),
          lambda ctx: None, _run_report, _report_fingerprint),
]


def stage_names() -> list[str]:
    return [stage.name for stage in STAGES]


# --------------------------------------------------------------------------------------------
# The driver


def run_pipeline(cfg: RunConfig, out: str | Path, budget_s: float | None,
                 progress: bool | None = None, log: Callable[[str], None] | None = None,
                 until: str | None = None) -> Path:
    """Run (or continue) every stage in `out`, or those up to `until`; returns the report directory."""
    ctx = Context(cfg, RunLayout(Path(out)), budget_s, time.monotonic(),
                  sys.stderr.isatty() if progress is None else progress,
                  stamp=dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ"))
    layout = ctx.layout
    stages = selected_stages(until)
    _check_run_dir(layout.root)
    records = StageRecords(layout.stages)
    # Everything that can refuse the run is checked before the first write.
    planned = _plan(ctx, records, stages)
    posttrain.check_available(cfg, [stage.name for stage in stages])
    ctx.selected, ctx.planned = [stage.name for stage in stages], planned
    ctx.estimates = {name: _estimate_s(ctx, name, records) for name in ctx.selected}
    _check_budget(ctx, planned, up_front=True)

    layout.root.mkdir(parents=True, exist_ok=True)
    layout.logs.mkdir(exist_ok=True)
    show = log or (lambda line: print(line, flush=True))

    def say(line: str) -> None:
        """Show a progress line and keep it, timestamped, in logs/pipeline.log."""
        show(line)
        with open(layout.pipeline_log, "a", encoding="utf-8") as f:
            f.write(f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M:%S} {line}\n")

    ctx.old_config = layout.config.read_text(encoding="utf-8") if layout.config.is_file() else None
    atomic_write_text(layout.config, cfg.to_toml())
    budget = f"time budget {budget_s / 60:.1f} min" if budget_s else "no time budget"
    which = f"{len(stages)} stages" + (f", up to {until}" if until else "")
    say(f"lmforge run: {layout.root} ({budget}; {which})")
    for number, stage in enumerate(stages, 1):
        inputs = {"config": stage.config(ctx),
                  "after": {name: _upstream(records, name) for name in stage.after}}
        digest = inputs_hash(inputs)
        head = f"{f'[{number}/{len(stages)}]':<7} {stage.name:<9}"
        record = records.get(stage.name)
        # A planned stage is looked at again: the stage before it may have made the same outputs.
        if stage.name not in planned or (records.is_current(stage.name, digest)
                                         and stage.fingerprint(ctx) == record.get("outputs")):
            say(f"{head} skipped: unchanged since {record.get('finished_at', '?')}")
            continue
        ctx.left = planned[planned.index(stage.name):]
        if ctx.trains(stage.name):  # the stages before may have taken longer than they did before
            _check_budget(ctx, ctx.left, up_front=False)
        # Same inputs as the last attempt: what that attempt left may be continued.
        ctx.same_inputs = bool(record and record.get("inputs_hash") == digest)
        if not ctx.same_inputs:
            kept = _keep_previous(ctx, stage, record)
            if kept is not None:
                say(f"{head} inputs changed: the previous outputs are kept in {kept}")
        unfinished = ctx.same_inputs and record.get("status") == "running"
        say(f"{head} running" + (" (continuing an unfinished attempt)" if unfinished else ""))
        if unfinished:  # its earlier attempts' seconds come off its share of the budget
            ctx.spent[stage.name] = records.spent_s(stage.name)
        records.started(stage.name, digest, inputs)
        start = time.monotonic()
        try:
            stage.run(ctx)
        except BaseException:
            records.stopped(stage.name, time.monotonic() - start)
            raise
        seconds = time.monotonic() - start
        ctx.estimates[stage.name] = seconds
        outputs = stage.fingerprint(ctx)
        if outputs is None:  # pragma: no cover - a stage that returned without its outputs is a bug
            raise RuntimeError(f"stage {stage.name} finished without writing its outputs")
        records.completed(stage.name, outputs, seconds)
        say(f"{head} done in {seconds:.1f}s")
    total = time.monotonic() - ctx.started
    say(f"finished in {total / 60:.1f} min")
    return layout.report


def selected_stages(until: str | None) -> list[Stage]:
    """Every stage, or the stages up to and including `until`."""
    names = [stage.name for stage in STAGES]
    if until is None:
        return list(STAGES)
    if until not in names:
        raise UserError(f"--until {until}: no such stage; the stages are {', '.join(names)}")
    return STAGES[: names.index(until) + 1]


def _check_run_dir(root: Path) -> None:
    """`--out` is new, empty, or a run (of `lmforge run` or `lmforge pretrain`): never a folder of
    other files that the run would write into."""
    if not root.exists():
        return
    if not root.is_dir():
        raise UserError(f"--out {root} is a file; give a run directory")
    layout = RunLayout(root)
    if layout.stages.is_file() or layout.config.is_file():
        return
    if any(p.name != LOCK_NAME for p in root.iterdir()):
        raise UserError(f"--out {root} holds other files and is not a run directory (no stages.json "
                        "or config.toml); give a new or empty directory, or a run to continue")


def _plan(ctx: Context, records: StageRecords, stages: list[Stage]) -> list[str]:
    """The stages this invocation will run: changed ones, ones with missing outputs, and every
    stage after one of those."""
    planned: list[str] = []
    for stage in stages:
        # Every stage's config is read, so that a mistake in a later stage's settings is refused
        # now, not after pre-training.
        inputs = {"config": stage.config(ctx),
                  "after": {name: _upstream(records, name) for name in stage.after}}
        if any(name in planned for name in stage.after):
            planned.append(stage.name)
            continue
        record = records.get(stage.name)
        if not (records.is_current(stage.name, inputs_hash(inputs))
                and stage.fingerprint(ctx) == record.get("outputs")):
            planned.append(stage.name)
    return planned


def _estimate_s(ctx: Context, name: str, records: StageRecords) -> float:
    """The least time stage `name` needs: a training stage run.min_stage_s; any other as long as
    its last attempt took, or before it was ever measured its FIXED_COST_S (0 for the data stages)."""
    if ctx.trains(name):
        return ctx.cfg.run.min_stage_s
    if name == "align":  # run.align = none
        return 0.0
    measured = (records.get(name) or {}).get("seconds")
    return float(measured) if measured is not None else FIXED_COST_S.get(name, 0.0)


def _check_budget(ctx: Context, left: list[str], up_front: bool) -> None:
    """Refuse, before a stage touches anything, a budget that cannot fit the stages left: up front
    (before any stage) and again right before each training stage."""
    remaining = ctx.remaining_s()
    if remaining is None or not any(ctx.trains(name) for name in left):
        return
    need = sum(ctx.estimates.get(name, 0.0) for name in left)
    if up_front:
        need += DRIVER_RESERVE_S
    if remaining >= need:
        return
    assert ctx.budget_s is not None
    trained = [name for name in left if ctx.trains(name)]
    if up_front:
        smallest = math.ceil((ctx.budget_s - remaining + need) / 10) * 10
        others = sum(ctx.estimates.get(name, 0.0) for name in left if name not in trained)
        raise UserError(
            f"--time-budget {ctx.budget_s:.0f}s is too small for the stages left ({', '.join(left)}): "
            f"each training stage ({', '.join(trained)}) needs run.min_stage_s = "
            f"{ctx.cfg.run.min_stage_s:.0f}s and the others {others:.0f}s as last measured or "
            f"estimated; give --time-budget {smallest}s or more (or 'none')")
    raise UserError(
        f"--time-budget: only {max(remaining, 0):.0f}s of {ctx.budget_s:.0f}s left for "
        f"{', '.join(left)} after the stages before them; those are finished now, so the same "
        f"command again gives the stages left the whole budget")


def _keep_previous(ctx: Context, stage: Stage, record: dict[str, Any] | None) -> Path | None:
    """Move what `stage` left on other inputs to RUN/previous/STAGE-STAMP/ (replacing the stage's
    older entry there); None if nothing."""
    layout = ctx.layout
    found = [p for p in stage.outputs(layout) if p.exists()]
    if not found:
        return None
    kept = layout.previous / f"{stage.name}-{ctx.stamp}"
    for n in range(1, 1000):  # two redone stages of one invocation never share a directory
        if not kept.exists():
            break
        kept = layout.previous / f"{stage.name}-{ctx.stamp}-{n}"
    kept.mkdir(parents=True)
    for path in found:
        target = kept / path.relative_to(layout.root)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, target)  # a rename: nothing is copied or lost
    if ctx.old_config is not None:
        atomic_write_text(kept / "config.toml", ctx.old_config)
    atomic_write_json(kept / PREVIOUS_NOTE, {
        "stage": stage.name, "moved_at": ctx.stamp,
        "why": f"lmforge run redid {stage.name} on changed inputs",
        "record": record or {}, "paths": [str(p.relative_to(layout.root)) for p in found]})
    # One previous attempt per stage: older ones would pile up (a checkpoint each) on every change.
    for older in _previous_of(layout.previous, stage.name):
        if older != kept:
            shutil.rmtree(older)
    return kept


def _previous_of(previous: Path, stage: str) -> list[Path]:
    """The RUN/previous/ entries that hold stage `stage`'s outputs (by their previous.json)."""
    found = []
    for entry in sorted(previous.iterdir()):
        note = entry / PREVIOUS_NOTE
        try:
            if json.loads(note.read_text(encoding="utf-8")).get("stage") == stage:
                found.append(entry)
        except (OSError, ValueError):  # not an entry this driver wrote: left alone
            continue
    return found


def _upstream(records: StageRecords, name: str) -> dict[str, Any]:
    """What a downstream stage depends on of stage `name`: its inputs and its outputs."""
    record = records.get(name) or {}
    return {"inputs_hash": record.get("inputs_hash"), "outputs": record.get("outputs")}
