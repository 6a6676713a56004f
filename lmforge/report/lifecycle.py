"""Report sections of the stages after pre-training: headline figures, the evaluation table (base vs
SFT vs aligned, with chance levels and published scores of known models), the SFT and alignment
curves, chat transcripts and the exported files. Each reads only what its stage wrote (layout.py)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from lmforge.report import plots
from lmforge.report.document import Block, Code, Figure, Paragraph, Table
from lmforge.report.metrics import Metrics, read_metrics
from lmforge.report.reference_scores import REFERENCES

MODEL_LABELS = {"base": "base (pre-trained)", "sft": "SFT", "aligned": "aligned"}
# Alignment metrics worth a curve, by the names the stages log (issue 17): DPO, reward model, GRPO.
ALIGN_SERIES = {
    "reward_margin": ("DPO reward margin (chosen - rejected)", "margin"),
    "reward_accuracy": ("DPO reward accuracy (chosen above rejected)", "share of pairs"),
    "accuracy": ("Reward model pairwise accuracy", "share of pairs"),
    "reward_mean": ("GRPO mean reward", "reward"),
    "pass_at_1": ("GRPO pass@1 on held-out tasks", "pass@1"),
}


def _read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _stage_metrics(run_dir: Path) -> Metrics | None:
    path = run_dir / "metrics.jsonl"
    return read_metrics(path) if path.is_file() else None


def _config_align(run) -> str:
    return run.config.run.align if run.config is not None else "dpo"


# --------------------------------------------------------------------------------------------
# Headline figures (rows added to the summary)


def headline_rows(run) -> list[list[str]]:
    """The lifecycle's outcome in a few rows: the final model and its main scores."""
    layout = run.layout
    rows: list[list[str]] = []
    sft = _stage_metrics(layout.sft)
    if sft and sft.last("val_loss") is not None:
        rows.append(["SFT validation loss (assistant tokens)", f"{sft.last('val_loss'):.4f}"])
    align = _stage_metrics(layout.align)
    for key in ("reward_accuracy", "reward_margin", "pass_at_1", "reward_mean"):
        value = align.last(key) if align else None
        if value is not None:
            rows.append([f"alignment {key.replace('_', ' ')} (last)", f"{value:.4f}"])
    if layout.eval_results.is_file():
        models = _read_json(layout.eval_results).get("models", {})
        for label, result in models.items():
            core = result.get("core")
            if core:
                rows.append([f"CORE score, {MODEL_LABELS.get(label, label)}", f"{core['centered']:.4f}"])
    if layout.chat.is_file():
        transcripts = _read_json(layout.chat).get("transcripts", [])
        right = sum(bool(t.get("correct")) for t in transcripts)
        rows.append(["held-out chat questions answered right (transcripts)", f"{right} of {len(transcripts)}"])
    if layout.stages.is_file():
        from lmforge.checkpoint import resolve_checkpoint
        from lmforge.errors import UserError

        try:
            final = resolve_checkpoint(layout.root)
            rows.append(["final model (--checkpoint RUN)", str(final.relative_to(layout.root))])
        except UserError:
            pass
    return rows


# --------------------------------------------------------------------------------------------
# Evaluation table


def evaluation(run) -> list[Block] | str:
    path = run.layout.eval_results
    if not path.is_file():
        return f"no evaluation results at {path} (the eval stage of `lmforge run`)"
    results = _read_json(path)
    return evaluation_blocks(results)


def evaluation_blocks(results: dict[str, Any]) -> list[Block]:
    """One row per task and metric, one column per model, with chance and published scores."""
    models: dict[str, Any] = results.get("models", {})
    labels = list(models)
    references = list(REFERENCES)
    headers = ["task", "metric", "chance", *(MODEL_LABELS.get(m, m) for m in labels), *references]
    rows = []
    for task, metric in _task_metrics(models):
        rows.append(_task_row(task, metric, models, labels, references))
        if metric == "acc":
            rows += _subtask_rows(task, models, labels, references)
    cores = [models[m].get("core") for m in labels]
    if any(cores):
        rows.append(["CORE (centred mean)", "centred acc", "0", *(_num(c and c["centered"]) for c in cores),
                     *("-" for _ in references)])
    blocks: list[Block] = [
        Paragraph(f"Each model of the run on the same items (the first {results.get('limit') or 'all'} "
                  "of each task), zero-shot: multiple-choice tasks by the log-likelihood of each "
                  "choice (acc; acc_norm divides by the choice's length), bpb on the run's "
                  "validation shards (lower is better), CORE the mean of each core task's accuracy "
                  "centred by its chance level. The last columns are published zero-shot scores "
                  "of known models for orientation ("
                  + "; ".join(f"{name}: {ref['source']}" for name, ref in REFERENCES.items())
                  + "); a tiny CPU model is expected near chance on these benchmarks."),
        Table(headers, rows),
    ]
    if results.get("skipped"):
        blocks.append(Paragraph("Not evaluated, the time budget being spent before they started: "
                                + ", ".join(results["skipped"]) + "."))
    return blocks


def _task_metrics(models: dict[str, Any]) -> list[tuple[str, str]]:
    """(task, metric) pairs in the order the results list them, each once."""
    pairs: list[tuple[str, str]] = []
    for result in models.values():
        for task, metrics in result.get("results", {}).items():
            for key in ("bpb", "acc", "acc_norm", "pass@1", "perplexity"):
                if key in metrics and (task, key) not in pairs:
                    pairs.append((task, key))
    return pairs


def _subtask_rows(task: str, models: dict[str, Any], labels: list[str], references: list[str]) -> list[list[str]]:
    """A task made of several (the `chat` task's generators: arithmetic, letters, ...): a row for
    each, since their mean hides what fine-tuning taught (arithmetic near 100%, corpus questions
    near 0)."""
    parts: dict[str, None] = {}
    for m in labels:
        parts.update(dict.fromkeys(models[m].get("results", {}).get(task, {}).get("tasks", {}) or {}))
    return [[f"{task}: {part}", "acc", "-",
             *(_num(models[m].get("results", {}).get(task, {}).get("tasks", {}).get(part)) for m in labels),
             *("-" for _ in references)] for part in parts]


def _task_row(task: str, metric: str, models: dict[str, Any], labels: list[str],
              references: list[str]) -> list[str]:
    chance = _chance(task) if metric in ("acc", "acc_norm") else None
    values = [models[m].get("results", {}).get(task, {}).get(metric) for m in labels]
    published = [_reference(r, task, metric) for r in references]
    return [task, metric, _num(chance), *(_num(v) for v in values), *(_num(p) for p in published)]


def _reference(name: str, task: str, metric: str) -> float | None:
    """A known model's published score of `task`, on the row of the metric it was scored by."""
    scores: dict[str, tuple[str, float]] = REFERENCES[name]["scores"]  # type: ignore[assignment]
    scored_by, value = scores.get(task, ("", None))
    return value if scored_by == metric else None


def _chance(task: str) -> float | None:
    from lmforge.errors import UserError
    from lmforge.eval.tasks import benchmark

    try:
        return benchmark(task).chance
    except UserError:  # bpb, chat and other tasks without a chance level
        return None


def _num(value: Any) -> str:
    if not isinstance(value, (int, float)) or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.3f}"


# --------------------------------------------------------------------------------------------
# Curves of the fine-tuning stages


def fine_tuning(run) -> list[Block] | str:
    metrics = _stage_metrics(run.layout.sft)
    if metrics is None:
        return f"no SFT run at {run.layout.sft}"
    blocks: list[Block] = []
    if plots.plot_loss(metrics, run.plots_dir / "sft_loss.png"):
        blocks.append(Figure(f"{run.plots_dir.name}/sft_loss.png",
                             "SFT: loss on the assistant tokens per step, validation loss on held-out "
                             "conversations"))
    for key, (title, ylabel) in _score_series(metrics, {}).items():
        name = f"sft_{key.replace('/', '_')}.png"
        if plots.plot_series(metrics, key, f"SFT: {title}", ylabel, run.plots_dir / name):
            blocks.append(Figure(f"{run.plots_dir.name}/{name}", f"SFT: {title}"))
    base = run.layout.sft / "base.json"
    if base.is_file():
        cfg = run.config
        how = f"LoRA rank {cfg.lora.rank}" if cfg and cfg.lora.rank else "full fine-tuning"
        data = ", ".join(cfg.sft.data) if cfg else "?"
        blocks.append(Paragraph(f"Fine-tuned from {_read_json(base).get('checkpoint')} on {data} ({how})."))
    return blocks or "the SFT run logged no steps"


def alignment(run) -> list[Block] | str:
    method = _config_align(run)
    if method == "none":
        return [Paragraph("run.align = none: no alignment stage ran; the SFT model is the final model.")]
    metrics = _stage_metrics(run.layout.align)
    if metrics is None:
        return f"no alignment run at {run.layout.align}"
    blocks: list[Block] = []
    if plots.plot_loss(metrics, run.plots_dir / "align_loss.png"):
        blocks.append(Figure(f"{run.plots_dir.name}/align_loss.png", f"{method.upper()}: loss per step"))
    for key, (title, ylabel) in _score_series(metrics, ALIGN_SERIES).items():
        name = f"align_{key.replace('/', '_')}.png"
        if plots.plot_series(metrics, key, title, ylabel, run.plots_dir / name):
            blocks.append(Figure(f"{run.plots_dir.name}/{name}", title))
    return blocks or "the alignment run logged no steps"


def _score_series(metrics: Metrics, known: dict[str, tuple[str, str]]) -> dict[str, tuple[str, str]]:
    """The known series, then any other reward, accuracy or pass@k a stage logged (e.g. held-out
    accuracy under a name of its own, or evaluation tasks run during training)."""
    series = dict(known)
    for record in metrics.records:
        if "event" in record:
            continue
        for key, value in record.items():
            words = set(re.split(r"[_/@.]", key))
            if (key not in series and isinstance(value, (int, float)) and not isinstance(value, bool)
                    and words & {"reward", "acc", "accuracy", "pass"}):
                series[key] = (key.replace("_", " "), key.replace("_", " "))
    return series


def per_step_tables(run) -> list[Block] | str:
    """Validation losses at each evaluation of every training stage (appendix)."""
    blocks: list[Block] = []
    for title, run_dir in (("pre-training", run.layout.root), ("SFT", run.layout.sft),
                           ("alignment", run.layout.align)):
        metrics = _stage_metrics(run_dir)
        evals = metrics.val("val_loss") if metrics else []
        if not evals:
            continue
        bpb = dict(metrics.val("val_bpb")) if metrics else {}
        rows = [[f"{s:,}", f"{v:.4f}", f"{bpb[s]:.4f}" if s in bpb else "-"] for s, v in evals]
        blocks.append(Paragraph(f"{title}: validation loss at each evaluation"))
        blocks.append(Table(["step", "validation loss", "bits per byte"], rows))
    return blocks or "no stage logged a validation loss"


# --------------------------------------------------------------------------------------------
# Transcripts and export


def transcripts(run) -> list[Block] | str:
    path = run.layout.chat
    if not path.is_file():
        return f"no chat transcripts at {path}"
    chat = _read_json(path)
    blocks: list[Block] = [Paragraph(
        f"Held-out builtin:chat questions answered by the final model ({chat.get('checkpoint')}), "
        "greedy, each checked by its task's verifier:")]
    for t in chat.get("transcripts", []):
        lines = [f"{m['role']}: {m['content']}" for m in t.get("messages", [])]
        verdict = "right" if t.get("correct") else "wrong"
        blocks.append(Paragraph(f"{t.get('task')} ({verdict}); reference: {t.get('reference', '')!r}"))
        blocks.append(Code("\n".join(lines)))
    return blocks


def export(run) -> list[Block] | str:
    from lmforge.pipeline.posttrain import EXPORT_NOTE

    note = run.layout.export / EXPORT_NOTE
    if not note.is_file():
        return f"no export at {run.layout.export}"
    meta = _read_json(note)
    from lmforge.report.collect import _bytes

    rows = [[name, _bytes(size)] for name, size in meta.get("files", {}).items()]
    return [Paragraph(f"The final model ({meta.get('checkpoint')}) in {', '.join(meta.get('formats', []))} "
                      f"under {run.layout.export}: `hf/` loads with transformers' "
                      "AutoModelForCausalLM, `model.gguf` with llama.cpp."),
            Table(["file", "size"], rows)]
