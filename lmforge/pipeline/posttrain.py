"""The stages of `lmforge run` after pre-training: SFT -> alignment -> evaluation -> chat
transcripts -> export. Each calls the stage's own Python API (the one its command uses) on a
directory of the run (layout.py), so each is still runnable alone:

    sft     lmforge sft --checkpoint RUN/checkpoints/... --data builtin:chat --out RUN/sft
    align   lmforge dpo (or grpo) --checkpoint RUN/sft --out RUN/align
    eval    lmforge eval --checkpoint CKPT --tasks chat,bpb,core --limit N   (base, SFT, aligned)
    chat    held-out builtin:chat questions answered by the final model -> RUN/logs/chat.json
    export  lmforge export hf / lmforge export gguf of the final model -> RUN/export/

The training stages (sft, align) get their seconds from Context.stage_budget_s and continue an
interrupted attempt from its newest checkpoint, as pre-training does, with what is left of their
share (budget_stage).
"""

from __future__ import annotations

import copy
import dataclasses
import shutil
import signal
import time
from pathlib import Path
from typing import Any

from lmforge.atomic import atomic_directory, atomic_write_json
from lmforge.config import RunConfig, apply_override
from lmforge.errors import ConfigError, Interrupted, UserError
from lmforge.hashing import file_sha256
from lmforge.pipeline.records import inputs_hash
from lmforge.pipeline.stage import DRIVER_RESERVE_S, Context

EXPORT_NOTE = "export.json"  # in RUN/export: which checkpoint was exported, and the files
GGUF_FILE = "model.gguf"
GGUF_DTYPE = "f16"  # half the size of f32; llama.cpp's logits stay within its tests' tolerance


# The functions the align and export stages call, by choice (other modules of lmforge own them).
ALIGN_TRAINERS = {"dpo": ("lmforge.align.dpo", "run_dpo"), "grpo": ("lmforge.align.grpo", "run_grpo")}
GGUF_EXPORTER = ("lmforge.interop.gguf", "export_gguf")
# The fine-tuning stages of the lifecycle start from the train.* and guard.* defaults of their own
# command (`lmforge sft / dpo / grpo`, rows of lmforge/finetune/stages.py), so they train as it does.
STAGE_DEFAULTS = ("sft", "dpo", "grpo")


def _function(module: str, name: str):
    import importlib

    return getattr(importlib.import_module(module), name)


def check_available(cfg: RunConfig, stages: list[str]) -> None:
    """Refuse up front (not after pre-training) an alignment method or export format whose module
    this installation lacks."""
    import importlib.util

    wanted = []
    if "align" in stages and cfg.run.align in ALIGN_TRAINERS:
        wanted.append((f"run.align={cfg.run.align}", ALIGN_TRAINERS[cfg.run.align][0]))
    if "export" in stages and "gguf" in cfg.run.export:
        wanted.append(("run.export=gguf", GGUF_EXPORTER[0]))
    for setting, module in wanted:
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:  # its package is missing too
            found = False
        if not found:
            raise UserError(f"{setting} needs {module}, which this lmforge does not have; "
                            "choose another (run.align=none, run.export=hf)")


# --------------------------------------------------------------------------------------------
# Checkpoints of the run's stages


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete training checkpoint of a stage's run directory."""
    from lmforge.train.checkpoint import CheckpointManager

    return CheckpointManager(run_dir, 1).latest() if (run_dir / "checkpoints").is_dir() else None


def pretrained(ctx: Context) -> Path:
    checkpoint = latest_checkpoint(ctx.layout.root)
    if checkpoint is None:
        raise UserError(f"no complete checkpoint under {ctx.layout.checkpoints}: run pre-training first")
    return checkpoint


def stage_model(run_dir: Path) -> Path | None:
    """A stage's model: the checkpoint its run selected by held-out score (DPO, GRPO:
    checkpoints/selected.json), else its newest complete one."""
    from lmforge.checkpoint import run_result

    return run_result(run_dir / "checkpoints")


def stage_models(ctx: Context) -> dict[str, Path]:
    """The models the run has made so far, in lifecycle order: base, sft, aligned."""
    found = {"base": latest_checkpoint(ctx.layout.root), "sft": stage_model(ctx.layout.sft),
             "aligned": stage_model(ctx.layout.align)}
    return {label: path for label, path in found.items() if path is not None}


def final_model(ctx: Context) -> Path:
    """The last model of the lifecycle (what `--checkpoint RUN` resolves to)."""
    from lmforge.checkpoint import resolve_checkpoint

    return resolve_checkpoint(ctx.layout.root)


def checkpoint_fingerprint(run_dir: Path) -> str | None:
    """The newest checkpoint's name and the hash of its weights (full or LoRA adapters)."""
    latest = latest_checkpoint(run_dir)
    if latest is None:
        return None
    weights = [file_sha256(latest / name) for name in ("model.safetensors", "lora.safetensors")
               if (latest / name).is_file()]
    return inputs_hash({"checkpoint": latest.name, "weights": weights})


def stage_config(cfg: RunConfig, kind: str, field: str) -> RunConfig:
    """The run's config with a fine-tuning stage's train and guard defaults (its command's, `kind`
    of STAGE_DEFAULTS) and its overrides (`run.<field>`, e.g. run.sft_overrides)."""
    from lmforge.finetune.stages import STAGES, resolve

    row = STAGES[kind]
    stage = copy.deepcopy(cfg)
    stage.guard = dataclasses.replace(stage.guard, **resolve(row.guard_defaults))
    stage.train = dataclasses.replace(stage.train, **resolve(row.train_defaults), time_budget="")
    try:
        for item in getattr(cfg.run, field):
            apply_override(stage, item)
        stage.validate()
    except ConfigError as e:
        raise ConfigError(f"run.{field}: {e}") from None
    if stage.model != cfg.model:
        raise UserError(f"run.{field}: a fine-tuning stage keeps the pre-trained model's "
                        "architecture; drop the model.* items")
    return stage


def _train_inputs(ctx: Context, name: str, stage_cfg: RunConfig) -> dict[str, Any]:
    train = dataclasses.asdict(stage_cfg.train)
    train.pop("time_budget")  # set from the budget split
    return {"train": train, "guard": dataclasses.asdict(stage_cfg.guard), "budget_s": ctx.budget_s,
            "share": ctx.cfg.run.share(name)}


def _resume_or_clear(ctx: Context, run_dir: Path) -> Path | None:
    """The checkpoint an unfinished attempt on the same inputs left; else a clean run_dir."""
    resume_from = latest_checkpoint(run_dir) if ctx.same_inputs else None
    if resume_from is None:
        shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    if resume_from is not None:
        print(f"  resuming from {resume_from.relative_to(ctx.layout.root)}", flush=True)
    return resume_from


def budget_stage(ctx: Context, name: str, cfg: RunConfig, resume_from: Path | None) -> float | None:
    """Set training stage `name`'s seconds (Context.stage_budget_s) as cfg.train.time_budget. A
    continued stage goes on to the max_steps and warmup its checkpoint was sized to (its learning
    rate curve goes on where it was), re-sized by the loop to the seconds left of its share."""
    from lmforge.checkpoint import read_config

    if resume_from is not None:
        saved = read_config(resume_from).train
        cfg.train.max_steps, cfg.train.warmup_steps = saved.max_steps, saved.warmup_steps
    seconds = ctx.stage_budget_s(name)
    if seconds is not None:
        cfg.train.time_budget = f"{seconds:.0f}s"
    return seconds


def _stopped(result: Any) -> None:
    if result.stopped_by_signal:  # checkpointed; the stage stays unfinished and resumes next time
        raise Interrupted(result.signal or signal.SIGINT, saved=True)


# --------------------------------------------------------------------------------------------
# sft


def sft_stage_config(ctx: Context) -> RunConfig:
    """`lmforge sft`'s defaults, run.sft_overrides, and run.sft_text's share of RUN/data."""
    cfg = stage_config(ctx.cfg, "sft", "sft_overrides")
    if ctx.cfg.run.sft_text > 0:
        cfg.sft.data = [*cfg.sft.data, f"text:{ctx.layout.data}:{ctx.cfg.run.sft_text:g}"]
    return cfg


def sft_inputs(ctx: Context) -> Any:
    stage = sft_stage_config(ctx)
    sft_section = dataclasses.asdict(stage.sft)
    # The shards' place is the run's own: a moved run directory is the same stage.
    sft_section["data"] = [d.replace(str(ctx.layout.data), "RUN/data") for d in stage.sft.data]
    return {"sft": sft_section, "lora": dataclasses.asdict(stage.lora), **_train_inputs(ctx, "sft", stage)}


def run_sft(ctx: Context) -> None:
    from lmforge.finetune.data import sft_data
    from lmforge.finetune.lora import base_reference
    from lmforge.finetune.sft import sft

    cfg = sft_stage_config(ctx)
    resume_from = _resume_or_clear(ctx, ctx.layout.sft)
    data = sft_data(cfg.sft, cfg.train.seed)  # first: the seconds it takes come off the budget
    seconds = budget_stage(ctx, "sft", cfg, resume_from)
    result = sft(cfg, base_reference(pretrained(ctx)), data, ctx.layout.sft, resume_from=resume_from,
                 time_budget_s=seconds)
    _stopped(result)


# --------------------------------------------------------------------------------------------
# align


def align_stage_config(cfg: RunConfig) -> RunConfig:
    """run.align's own command defaults (DPO's or GRPO's); with align none, SFT's (unused)."""
    return stage_config(cfg, cfg.run.align if cfg.run.align in STAGE_DEFAULTS else "sft", "align_overrides")


def align_inputs(ctx: Context) -> Any:
    if ctx.cfg.run.align == "none":
        return {"align": "none"}
    stage = align_stage_config(ctx.cfg)
    sections = {name: dataclasses.asdict(getattr(stage, name)) for name in ("dpo", "grpo")
                if hasattr(stage, name)}  # the alignment helpers' own config sections
    return {"align": ctx.cfg.run.align, **sections, "lora": dataclasses.asdict(stage.lora),
            **_train_inputs(ctx, "align", stage)}


def run_align(ctx: Context) -> None:
    method = ctx.cfg.run.align
    if method == "none":
        print("  run.align = none: the SFT model is the final model", flush=True)
        return
    train = _function(*ALIGN_TRAINERS[method])  # run_dpo / run_grpo(cfg, checkpoint, run_dir, resume)
    cfg = align_stage_config(ctx.cfg)
    resume_from = _resume_or_clear(ctx, ctx.layout.align)
    budget_stage(ctx, "align", cfg, resume_from)
    resume = resume_from is not None
    sft_model = latest_checkpoint(ctx.layout.sft)
    if sft_model is None:
        raise UserError(f"no complete checkpoint under {ctx.layout.sft}: run the sft stage first")
    _stopped(train(cfg, sft_model, ctx.layout.align, resume=resume))


def align_fingerprint(ctx: Context) -> str | None:
    if ctx.cfg.run.align == "none":
        return inputs_hash({"align": "none"})
    return checkpoint_fingerprint(ctx.layout.align)


# --------------------------------------------------------------------------------------------
# eval


def eval_inputs(ctx: Context) -> Any:
    return {"tasks": eval_tasks(ctx.cfg.run.eval_tasks), "limit": ctx.cfg.run.eval_limit}


def eval_tasks(spec: list[str]) -> list[str]:
    """run.eval_tasks with the groups (core, all) spelled out."""
    from lmforge.eval.tasks import resolve_tasks

    return resolve_tasks(",".join(spec))


def run_eval(ctx: Context) -> None:
    """Evaluate the base, SFT and aligned models task by task (every model on a task before the
    next task), within the seconds the budget leaves after the stages still to come: a task not
    started when they are spent is skipped for all models and listed in the results, so the
    models stay comparable on every task that ran and a loaded machine does not overrun the run."""
    from lmforge.eval.cli import load_for_eval
    from lmforge.eval.generation import resolve_format
    from lmforge.eval.runner import EvalOptions, core_score, evaluate

    tasks = eval_tasks(ctx.cfg.run.eval_tasks)
    deadline = eval_deadline(ctx)
    loaded = {}
    for label, checkpoint in stage_models(ctx).items():
        model, tokenizer = load_for_eval(checkpoint)
        # As `lmforge eval --format auto`: the fine-tuned models answer generation tasks (chat)
        # in the chat format, the base model gets few-shot text prompts.
        options = EvalOptions(limit=ctx.cfg.run.eval_limit or None, progress=ctx.progress,
                              bpb_data=ctx.layout.data, format=resolve_format("auto", checkpoint, tokenizer))
        loaded[label] = (model, tokenizer, options)
    results: dict[str, dict[str, Any]] = {label: {} for label in loaded}
    skipped: list[str] = []
    for task in tasks:
        if deadline is not None and time.monotonic() >= deadline:
            skipped.append(task)
            continue
        for label, (model, tokenizer, options) in loaded.items():
            results[label][task] = evaluate(model, tokenizer, [task], options)["results"][task]
    if skipped:
        print(f"  eval: the time budget was spent; skipped {', '.join(skipped)} "
              "(a larger --time-budget or a smaller run.eval_limit keeps them)", flush=True)
    models: dict[str, Any] = {}
    for label, checkpoint in stage_models(ctx).items():
        core = core_score(results[label])
        models[label] = {"checkpoint": str(checkpoint.relative_to(ctx.layout.root)),
                         "results": results[label], "core": core}
        print(f"  eval {label}: " + ", ".join(
            _headline(name, m) for name, m in results[label].items())
            + (f", CORE {core['centered']:.3f}" if core else ""), flush=True)
    atomic_write_json(ctx.layout.eval_results, {
        "tasks": tasks, "limit": ctx.cfg.run.eval_limit, "skipped": skipped, "models": models})


def eval_deadline(ctx: Context) -> float | None:
    """time.monotonic() by which evaluation starts its last task: the run's end less the last
    measured (or estimated) seconds of the stages after it. None without a budget."""
    remaining = ctx.remaining_s()
    if remaining is None:
        return None
    later = sum(ctx.estimates.get(name, 0.0) for name in ctx.left if name != "eval")
    return time.monotonic() + remaining - later - DRIVER_RESERVE_S


def _headline(name: str, metrics: dict[str, Any]) -> str:
    """"arc_easy acc 0.330", "bpb 1.838": a task's main number for the progress line."""
    key = next((k for k in ("bpb", "acc", "pass@1") if k in metrics), None)
    if key is None:
        return f"{name} -"
    return f"{name} {metrics[key]:.3f}" if key == name else f"{name} {key} {metrics[key]:.3f}"


def eval_fingerprint(ctx: Context) -> str | None:
    path = ctx.layout.eval_results
    return file_sha256(path) if path.is_file() else None


# --------------------------------------------------------------------------------------------
# chat transcripts


def chat_inputs(ctx: Context) -> Any:
    from lmforge.tasks import MIXTURE  # every builtin:chat task by name

    unknown = [name for name in ctx.cfg.run.chat_tasks if name not in MIXTURE]
    if unknown:
        raise UserError(f"run.chat_tasks: unknown task {unknown[0]!r}; known: {', '.join(MIXTURE)}")
    return {"tasks": ctx.cfg.run.chat_tasks, "questions": ctx.cfg.run.chat_questions,
            "seed": ctx.cfg.train.seed}


def run_chat(ctx: Context) -> None:
    """Greedy answers of the final model to held-out builtin:chat questions, each checked."""
    from lmforge.eval.cli import load_for_eval
    from lmforge.tasks import make_tasks
    from lmforge.tasks.score import score_task

    known = make_tasks(code_max_bytes=ctx.cfg.data.builtin_code_max_bytes)
    checkpoint = final_model(ctx)
    model, tokenizer = load_for_eval(checkpoint)
    transcripts = []
    for name in ctx.cfg.run.chat_tasks:
        task = known[name]
        score = score_task(model, tokenizer, task, n=ctx.cfg.run.chat_questions, seed=ctx.cfg.train.seed)
        for example, text in score.answers:
            transcripts.append({"task": name, "messages": [*example.prompt, {"role": "assistant", "content": text}],
                                "reference": example.reference, "correct": bool(task.check(example, text))})
    right = sum(t["correct"] for t in transcripts)
    print(f"  chat: {right} of {len(transcripts)} held-out questions answered right", flush=True)
    atomic_write_json(ctx.layout.chat, {"checkpoint": str(checkpoint.relative_to(ctx.layout.root)),
                                        "transcripts": transcripts})


def chat_fingerprint(ctx: Context) -> str | None:
    return file_sha256(ctx.layout.chat) if ctx.layout.chat.is_file() else None


# --------------------------------------------------------------------------------------------
# export


def run_export(ctx: Context) -> None:
    from lmforge.interop.hf import export_hf

    checkpoint = final_model(ctx)
    formats = ctx.cfg.run.export
    with atomic_directory(ctx.layout.export, overwrite=True) as tmp:
        if "hf" in formats:
            export_hf(checkpoint, tmp / "hf")
        if "gguf" in formats:
            _function(*GGUF_EXPORTER)(checkpoint, tmp / GGUF_FILE, dtype=GGUF_DTYPE)
        files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
        atomic_write_json(tmp / EXPORT_NOTE, {"checkpoint": str(checkpoint.relative_to(ctx.layout.root)),
                                              "formats": formats, "files": files})


def export_fingerprint(ctx: Context) -> str | None:
    directory = ctx.layout.export
    if not (directory / EXPORT_NOTE).is_file():
        return None
    return inputs_hash({str(p.relative_to(directory)): file_sha256(p)
                        for p in sorted(directory.rglob("*")) if p.is_file()})
