"""Gather what a run left on disk into report sections.

Each section is built by one function from the artefacts it needs. A missing artefact gives a
"Not available" section; an unreadable one gives the same with the reason, so a half-finished or
damaged run still gets a report of everything that is there.
"""

from __future__ import annotations

import datetime as dt
import json
import statistics
import sys
from collections.abc import Callable
from functools import cached_property
from pathlib import Path
from typing import Any

from lmforge.pipeline.layout import RunLayout
from lmforge.report import lifecycle, plots
from lmforge.report.document import (
    Block,
    Code,
    Figure,
    Paragraph,
    Report,
    Section,
    Table,
    not_available,
)
from lmforge.report.environment import machine_info
from lmforge.report.metrics import Metrics, read_metrics

# Names pre-training uses in metrics.jsonl (lmforge/train): the report plots what is there.
THROUGHPUT_KEY = "tokens_per_s"


class RunArtefacts:
    """Lazy, read-only access to the artefacts of one run directory; None where one is missing."""

    def __init__(self, run_dir: Path, plots_dir: Path) -> None:
        self.layout = RunLayout(run_dir)
        self.plots_dir = plots_dir

    @cached_property
    def config(self):
        """The resolved RunConfig: RUN/config.toml, else the newest checkpoint's; None if neither."""
        from lmforge.config import load_config

        if self.layout.config.is_file():
            return load_config(config_file=self.layout.config)
        if self.latest_checkpoint is not None:
            from lmforge.checkpoint import read_config

            return read_config(self.latest_checkpoint)
        return None

    @cached_property
    def latest_checkpoint(self) -> Path | None:
        """The newest complete training checkpoint (one with its COMPLETE marker)."""
        if not self.layout.checkpoints.is_dir():
            return None
        from lmforge.train.checkpoint import CheckpointManager

        return CheckpointManager(self.layout.root, keep_last=1).latest()

    @cached_property
    def metrics(self) -> Metrics | None:
        path = self.layout.metrics
        return read_metrics(path) if path.is_file() else None

    @cached_property
    def manifest(self) -> dict[str, Any] | None:
        path = self.layout.data_manifest
        return _read_json(path) if path.is_file() else None

    @cached_property
    def stages(self) -> dict[str, Any] | None:
        return _read_json(self.layout.stages) if self.layout.stages.is_file() else None

    @cached_property
    def samples(self) -> list[dict[str, Any]] | None:
        return _read_json(self.layout.samples) if self.layout.samples.is_file() else None

    @cached_property
    def tokenizer_stats(self) -> dict[str, Any] | None:
        """tokenizer/stats.json of a pipeline run, else what the tokenizer itself tells."""
        path = self.layout.tokenizer / "stats.json"
        if path.is_file():
            return _read_json(path)
        for directory in (self.layout.tokenizer, self.latest_checkpoint and self.latest_checkpoint / "tokenizer"):
            if directory and (directory / "tokenizer.json").is_file():
                from lmforge.tokenizer import load_tokenizer
                from lmforge.tokenizer.stats import tokenizer_stats

                return tokenizer_stats(load_tokenizer(directory), texts=[])
        return None


def _read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


# --------------------------------------------------------------------------------------------
# Sections


def summary(run: RunArtefacts) -> list[Block]:
    rows = [["run directory", str(run.layout.root.resolve())],
            ["report written", dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")]]
    if run.stages:
        total = sum(r.get("seconds", 0.0) for r in run.stages.get("stages", {}).values())
        rows.append(["time of all stages (their last attempts)", _duration(total)])
    if run.metrics:
        m = run.metrics
        steps = m.train("loss")
        if steps:
            rows.append(["optimizer steps", f"{steps[-1][0]:,}"])
        tokens = m.last("tokens")
        if tokens is not None:
            rows.append(["training tokens", f"{int(tokens):,}"])
        for key, label in (("loss", "final train loss"), ("val_loss", "final validation loss"),
                           ("val_bpb", "final validation bits per byte")):
            value = m.last(key)
            if value is not None:
                rows.append([label, f"{value:.4f}"])
    if run.latest_checkpoint is not None:
        rows.append(["pre-trained checkpoint", str(run.latest_checkpoint)])
    if run.config is not None:
        from lmforge.accounting import param_counts

        rows.append(["parameters", f"{param_counts(run.config.model).total:,}"])
    rows += lifecycle.headline_rows(run)
    return [Table(["quantity", "value"], rows)]


def configuration(run: RunArtefacts) -> list[Block] | str:
    if run.config is None:
        return "the run recorded no config (config.toml or a checkpoint's config.json)"
    return [Paragraph("The resolved config: defaults, then the preset, the TOML file and the --set "
                      "overrides. Passing this file as --config repeats the run."),
            Code(run.config.to_toml())]


def data(run: RunArtefacts) -> list[Block] | str:
    if run.manifest is None:
        return f"no data manifest at {run.layout.data_manifest}"
    return data_blocks(run.manifest)


def data_blocks(manifest: dict[str, Any]) -> list[Block]:
    """Sources, what each curation step kept and removed (with examples), tokens per split."""
    blocks: list[Block] = [Paragraph("Sources: " + ", ".join(manifest.get("sources", [])) + ".")]
    builtin = manifest.get("builtin") or []
    if builtin:
        blocks.append(Table(["built-in part", "from", "licence"],
                            [[b["part"], b.get("archive") or f"Python {b.get('python', '')}",
                              b.get("licence", "-")] for b in builtin]))
    read = manifest.get("read", {})
    docs, nbytes = read.get("documents", 0), read.get("bytes", 0)
    rows = [["read", _int(docs), _bytes(nbytes), "", ""]]
    examples: list[list[str]] = []
    for step in manifest.get("stages", []):
        docs -= step["removed_docs"]
        nbytes -= step["removed_bytes"]
        rows.append([step["name"], _int(docs), _bytes(nbytes), _int(step["removed_docs"]),
                     _bytes(step["removed_bytes"])])
        for example in step.get("examples", [])[:1]:
            detail = example.get("text") or example.get("duplicate_of") or ""
            examples.append([step["name"], str(example.get("id", "")), str(detail)])
    files = f" from {_int(read['files'])} files" if read.get("files") else ""
    blocks.append(Paragraph(
        f"Read {_int(read.get('documents'))} documents ({_bytes(read.get('bytes'))}){files}; "
        f"malformed lines {_int(read.get('malformed_lines'))}, "
        f"undecodable files {_int(read.get('decode_errors'))}, empty files "
        f"{_int(read.get('empty_files'))}. Each step below removes documents (cleaning removes bytes):"))
    blocks.append(Table(["step", "documents kept", "bytes kept", "documents removed", "bytes removed"],
                        rows))
    if examples:
        blocks.append(Paragraph("An example of what each step removed:"))
        blocks.append(Table(["step", "document", "text (start) or duplicate of"], examples))
    splits = manifest.get("splits", {})
    if splits:
        blocks.append(Table(["split", "documents", "bytes", "tokens", "shards"],
                            [[name, _int(s.get("documents")), _bytes(s.get("bytes")),
                              _int(s.get("tokens")), _int(len(s.get("shards", [])))]
                             for name, s in splits.items()]))
    tok = manifest.get("tokenizer") or {}
    if tok:
        blocks.append(Paragraph(f"Tokenized with {tok.get('hash', '?')} (vocabulary "
                                f"{_int(tok.get('vocab_size'))}), {manifest.get('dtype', '?')} shards."))
    return blocks


def tokenizer(run: RunArtefacts) -> list[Block] | str:
    stats = run.tokenizer_stats
    if stats is None:
        return f"no tokenizer at {run.layout.tokenizer} or in a checkpoint"
    per_token = stats.get("val_bytes_per_token")
    rows = [["vocabulary size", _int(stats.get("vocab_size"))],
            ["byte tokens + merges + special tokens",
             f"256 + {_int(stats.get('merges'))} + {_int(stats.get('special_tokens'))}"],
            ["bytes per token on the validation split",
             f"{per_token:.3f} ({_int(stats.get('val_bytes'))} bytes -> "
             f"{_int(stats.get('val_tokens'))} tokens)" if per_token else "not measured"],
            ["content hash", str(stats.get("content_hash", "-"))]]
    blocks: list[Block] = [Table(["quantity", "value"], rows)]
    longest = stats.get("longest_tokens") or []
    if longest:
        blocks.append(Paragraph("The longest tokens other than whitespace runs (bytes that are not "
                                "UTF-8 shown as \\xNN); the longest whitespace token has "
                                f"{_int(stats.get('longest_whitespace_token'))} bytes:"))
        blocks.append(Table(["id", "bytes", "token"],
                            [[str(t["id"]), str(t["bytes"]), repr(t["text"])] for t in longest]))
    return blocks


def model(run: RunArtefacts) -> list[Block] | str:
    if run.config is None:
        return "no config to describe the model from"
    from lmforge import accounting

    return accounting_blocks(accounting, run.config, run.metrics)


def accounting_blocks(accounting, cfg, metrics: Metrics | None) -> list[Block]:
    """Parameters by group, FLOPs per token, training memory and the compute the run spent."""
    human = accounting.human
    counts = accounting.param_counts(cfg.model).as_dict()
    seq_len = cfg.train.seq_len or cfg.model.max_seq_len
    flops = accounting.flops_per_token(cfg.model, seq_len)
    device_type = "cuda" if cfg.train.device == "cuda" else "cpu"  # "auto": the CPU, where runs start
    memory = accounting.training_memory(cfg, cfg.train.batch_size, seq_len, device_type)
    m = cfg.model
    blocks: list[Block] = [
        Paragraph(f"{m.arch} decoder: {m.n_layers} layers, d_model {m.d_model}, {m.n_heads} query / "
                  f"{m.kv_heads} key-value heads, MLP width {m.ffn_dim}, vocabulary {m.vocab_size}, "
                  f"context {m.max_seq_len}" + (", tied embeddings." if m.tie_embeddings else ".")),
        Table(["parameters", "count"], [[group, f"{n:,} ({human(n)})"] for group, n in counts.items()]),
        Table(["per token", "FLOPs"], [[f"{kind} (T = {seq_len})", human(v, "FLOP")]
                                       for kind, v in flops.items()]),
        Table([f"training memory ({accounting.memory_mode(cfg, device_type)}), batch {cfg.train.batch_size} x "
               f"{seq_len}", "bytes"],
              [[part, human(v, "B")] for part, v in memory.items()]),
    ]
    tokens = metrics.last("tokens") if metrics else None
    speed = [v for _, v in metrics.train(THROUGHPUT_KEY)] if metrics else []
    if tokens:
        spent = f"Training compute: {int(tokens):,} tokens x {human(flops['training'], 'FLOP')} = " \
                f"{human(tokens * flops['training'], 'FLOP')}; {tokens / counts['total']:.1f} tokens " \
                "per parameter (Chinchilla-optimal is about 20)"
        if speed:
            spent += f"; at the median throughput that is {human(statistics.median(speed) * flops['training'], 'FLOP')}/s"
        blocks.append(Paragraph(spent + "."))
    return blocks


def training(run: RunArtefacts) -> list[Block] | str:
    m = run.metrics
    if m is None:
        return f"no metrics at {run.layout.metrics}"
    blocks: list[Block] = []
    if m.skipped_lines:
        blocks.append(Paragraph(f"{m.skipped_lines} unreadable line(s) of metrics.jsonl were skipped "
                                "(a torn last line is what an interrupted run leaves)."))
    figures = [
        ("loss.png", "Training loss per step and validation loss at each evaluation",
         lambda p: plots.plot_loss(m, p)),
        ("lr.png", "Learning rate schedule",
         lambda p: plots.plot_series(m, "lr", "Learning rate", "learning rate", p)),
        ("throughput.png", "Training throughput",
         lambda p: plots.plot_series(m, THROUGHPUT_KEY, "Throughput", "tokens / s", p, smooth=True)),
    ]
    for name, caption, draw in figures:
        if draw(run.plots_dir / name):
            blocks.append(Figure(f"{run.plots_dir.name}/{name}", caption))
    speed = [v for _, v in m.train(THROUGHPUT_KEY)]
    if speed:
        blocks.append(Paragraph(
            f"Throughput: median {statistics.median(speed):,.0f} tokens/s, "
            f"max {max(speed):,.0f} tokens/s over {len(speed)} logged steps."))
    events = m.events()
    if events:
        blocks.append(Paragraph("Events of the training loop (budget sizing, resumes, rollbacks, stops):"))
        blocks.append(Table(["step", "event", "details"], [
            [str(e.get("step", "-")), str(e["event"]),
             ", ".join(f"{k}={_short(v)}" for k, v in e.items() if k not in ("step", "event"))]
            for e in events]))
    return blocks or "metrics.jsonl holds no training steps"


# ---- evaluation: `lmforge eval` results in RUN/eval/, and train.eval_tasks rows in the metrics

SCORE_KEYS = ("acc", "acc_norm", "bpb", "perplexity")  # besides pass@k, what a results entry scores


def read_eval_results(run_dir: Path) -> dict[str, dict[str, Any]]:
    """RUN/eval/<checkpoint>.json (written by `lmforge eval`), by checkpoint name in step order."""
    from lmforge.eval.cli import RESULTS_DIR

    files = sorted((run_dir / RESULTS_DIR).glob("*.json"), key=lambda f: _step_key(f.stem))
    read = {f.stem: _read_json(f) for f in files}
    # `lmforge run`'s eval stage writes RUN/eval/results.json with every model of the run
    # ("models"); lifecycle.evaluation shows that one.
    return {name: r for name, r in read.items() if "results" in r}


def _step_key(name: str) -> tuple[int, str]:
    digits = "".join(c for c in name if c.isdigit())
    return (int(digits) if digits else -1, name)


def _scores(metrics: dict[str, Any]) -> list[tuple[str, float]]:
    return [(k, v) for k, v in metrics.items()
            if (k in SCORE_KEYS or k.startswith("pass@")) and isinstance(v, (int, float))]


def evaluation_table(run: RunArtefacts) -> list[Block]:
    """The newest evaluated checkpoint's results, one row per task and score; with several
    evaluated checkpoints, each task's scores side by side across them."""
    results = read_eval_results(run.layout.root)
    if not results:
        return []
    name, latest = list(results.items())[-1]
    rows = [[task, key, f"{value:.4f}", _short(m.get(f"{key}_stderr", m.get("stderr", "-"))), _int(m.get("items")),
             str(m.get("shots", "-")), str(m.get("format", "base"))]
            for task, m in latest.get("results", {}).items() for key, value in _scores(m)]
    blocks: list[Block] = [
        Paragraph(f"`lmforge eval` results of checkpoint {name} (RUN/eval/{name}.json); stderr is "
                  "the standard error of the mean over items."),
        Table(["task", "metric", "value", "stderr", "items", "shots", "format"], rows)]
    if latest.get("core"):
        core = latest["core"]
        blocks.append(Paragraph(f"CORE (each core task centred by its chance level, averaged over "
                                f"{len(core.get('tasks', {}))}): {core['centered']:.4f}."))
    if len(results) > 1:
        names = list(results)
        cells: dict[str, dict[str, str]] = {}
        for checkpoint, r in results.items():
            for task, m in r.get("results", {}).items():
                for key, value in _scores(m):
                    cells.setdefault(f"{task} {key}", {})[checkpoint] = f"{value:.4f}"
        blocks.append(Paragraph("Across the evaluated checkpoints:"))
        blocks.append(Table(["task, metric", *names],
                            [[label, *(row.get(n, "-") for n in names)] for label, row in cells.items()]))
    return blocks


def evaluation_curves(run: RunArtefacts) -> list[Block]:
    """Benchmark scores logged during training (train.eval_tasks) against the step."""
    m = run.metrics
    if m is None:
        return []
    keys = [k for k in m.keys("eval/") if not k.endswith("/perplexity")]
    if not keys or not plots.plot_eval_curves(m, keys, run.plots_dir / "eval.png"):
        return []
    last = [[k.removeprefix("eval/"), f"{m.last(k):.4f}"] for k in keys]
    return [Figure(f"{run.plots_dir.name}/eval.png",
                   "Benchmark scores on fixed subsets at each evaluation (train.eval_tasks)"),
            Table(["task/metric", "last value"], last)]


def evaluation(run: RunArtefacts) -> list[Block]:
    """The lifecycle's models side by side (`lmforge run`), then `lmforge eval` results of single
    checkpoints and the scores logged during training. Benchmarks are optional, so a run without
    them gets how to add them, not "Not available"."""
    lifecycle_table = lifecycle.evaluation(run)
    blocks = (lifecycle_table if isinstance(lifecycle_table, list) else []) \
        + evaluation_table(run) + evaluation_curves(run)
    return blocks or [Paragraph("No benchmark results yet: `lmforge eval --checkpoint RUN_DIR --tasks "
                                "core` writes them to RUN/eval/, and train.eval_tasks logs scores "
                                "during training.")]


def samples(run: RunArtefacts) -> list[Block] | str:
    blocks: list[Block] = []
    for s in run.samples or []:
        prompt = repr(s["prompt"]) if s.get("prompt") else "none (a new document)"
        settings = ", ".join(f"{k} {s[k]}" for k in ("checkpoint", "temperature", "top_k") if k in s)
        blocks.append(Paragraph(f"Prompt: {prompt}" + (f" ({settings})" if settings else "")))
        blocks.append(Code(s.get("text") or "(nothing: the model ended the document at once)"))
    during = run.metrics.samples() if run.metrics else []
    if during:
        blocks.append(Paragraph("Samples taken during training (train.sample_every), the last few:"))
        blocks += [Code(f"step {r.get('step')}: {r['sample']}") for r in during[-3:]]
    return blocks or f"no samples at {run.layout.samples} and none in the metrics"


def timings(run: RunArtefacts) -> list[Block] | str:
    if not run.stages:
        return f"no stage records at {run.layout.stages}"
    rows = []
    for name, record in run.stages.get("stages", {}).items():
        status = record.get("status", "?")
        if status == "running":
            status = "writing this report" if name == "report" else "running or interrupted"
        rows.append([name, status, _duration(record.get("seconds")), str(record.get("finished_at", "-")),
                     str(record.get("attempts", 1))])
    blocks: list[Block] = [
        Paragraph("Time of each stage's last attempt; a stage skipped as unchanged keeps the "
                  "time of the run that did it."),
        Table(["stage", "status", "time", "finished", "attempts"], rows)]
    return blocks + previous_outputs(run)


def previous_outputs(run: RunArtefacts) -> list[Block]:
    """The outputs of stages redone on changed inputs, which `lmforge run` kept in RUN/previous/."""
    from lmforge.pipeline.run import PREVIOUS_NOTE

    kept = sorted(p for p in run.layout.previous.glob("*/") if (p / PREVIOUS_NOTE).is_file())
    if not kept:
        return []
    rows = []
    for path in kept:
        note = _read_json(path / PREVIOUS_NOTE)
        rows.append([str(note.get("stage", "?")), str(note.get("moved_at", "?")),
                     str(note.get("record", {}).get("finished_at", "-")), path.name])
    return [Paragraph(f"Redone on changed inputs, the earlier outputs of these stages are kept in "
                      f"{run.layout.previous} (delete a folder there to free its space)."),
            Table(["stage", "moved aside", "it had finished", "folder"], rows)]


def environment(run: RunArtefacts) -> list[Block]:
    path = run.layout.environment
    if path.is_file():
        info, origin = _read_json(path), "the machine that trained the model"
    else:
        info, origin = machine_info(), "the machine that wrote this report (the run recorded none)"
    libraries = info.pop("libraries", {})
    rows = [[k.replace("_", " "), str(v)] for k, v in info.items()]
    rows += [[name, version] for name, version in libraries.items()]
    return [Paragraph(f"From {origin}."), Table(["item", "value"], rows)]


# Ordered for a reader: the outcome (headline figures, evaluation, curves, what the model says)
# first, then how it was made, and the full config and per-step tables in the appendix.
SECTIONS: list[tuple[str, Callable[[RunArtefacts], list[Block] | str]]] = [
    ("Summary", summary),
    ("Evaluation", evaluation),
    ("Pre-training", training),
    ("Fine-tuning (SFT)", lifecycle.fine_tuning),
    ("Alignment", lifecycle.alignment),
    ("Chat transcripts", lifecycle.transcripts),
    ("Samples", samples),
    ("Export", lifecycle.export),
    ("Data", data),
    ("Tokenizer", tokenizer),
    ("Model and compute", model),
    ("Stage timings", timings),
    ("Appendix: configuration", configuration),
    ("Appendix: per-step tables", lifecycle.per_step_tables),
    ("Machine and libraries", environment),
]


def collect(run_dir: Path, plots_dir: Path) -> Report:
    run = RunArtefacts(run_dir, plots_dir)
    report = Report(f"lmforge run report: {run_dir.resolve().name}")
    for title, build in SECTIONS:
        try:
            blocks = build(run)
        except Exception as e:  # a damaged artefact costs its section, never the whole report
            print(f"report: section {title!r} not available: {e}", file=sys.stderr)
            blocks = f"could not read it ({type(e).__name__}: {e})"
        report.sections.append(not_available(title, blocks) if isinstance(blocks, str)
                               else Section(title, blocks))
    return report


# --------------------------------------------------------------------------------------------
# Formatting helpers


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _int(value: Any) -> str:
    return f"{int(value):,}" if isinstance(value, (int, float)) else "-"


def _bytes(value: Any) -> str:
    if not isinstance(value, (int, float)):
        return "-"
    for unit in ("B", "KB", "MB"):
        if abs(value) < 1000:
            return f"{value:,.0f} {unit}" if unit == "B" else f"{value:,.1f} {unit}"
        value /= 1000
    return f"{value:,.1f} GB"


def _duration(seconds: Any) -> str:
    if not isinstance(seconds, (int, float)):
        return "-"
    minutes, secs = divmod(float(seconds), 60)
    return f"{int(minutes)}m {secs:04.1f}s" if minutes else f"{secs:.1f}s"
