"""The run report: every section present, plots really drawn (PNG and a rasterised PDF page),
graceful with missing or damaged artefacts, and `lmforge report` as a command."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

from lmforge.atomic import atomic_write_json
from lmforge.config import load_config
from lmforge.report import build_report
from lmforge.report.collect import SECTIONS
from lmforge.report.metrics import read_metrics

SECTION_TITLES = [title for title, _ in SECTIONS]


def make_run_dir(root: Path, steps: int = 60) -> Path:
    """A run directory with the artefacts each stage writes, in their formats."""
    run = root / "run"
    (run / "logs").mkdir(parents=True)
    cfg = load_config(preset="tiny", overrides=["model.vocab_size=512", "tokenizer.vocab_size=512"])
    (run / "config.toml").write_text(cfg.to_toml(), encoding="utf-8")
    # The formats of lmforge/data/prepare.py (manifest.json) and of the pipeline's tokenizer stage.
    atomic_write_json(run / "data" / "manifest.json", {
        "format": "lmforge-shards", "version": 1, "sources": ["corpus/"], "builtin": None,
        "tokenizer": {"dir": "tokenizer", "hash": "sha256:abc", "vocab_size": 512, "eot_id": 506},
        "dtype": "uint16",
        "read": {"documents": 200, "bytes": 250_000, "files": 200, "empty_files": 1,
                 "malformed_lines": 2, "decode_errors": 0, "problems": []},
        "stages": [
            {"name": "clean", "removed_docs": 0, "removed_bytes": 240, "examples": []},
            {"name": "filter word_count", "removed_docs": 12, "removed_bytes": 3400,
             "examples": [{"id": "corpus/short.txt", "value": 3, "text": "too short"}]},
            {"name": "exact dedup", "removed_docs": 5, "removed_bytes": 9100,
             "examples": [{"id": "corpus/copy.txt", "duplicate_of": "corpus/orig.txt"}]},
            {"name": "near dedup", "removed_docs": 3, "removed_bytes": 4000, "examples": []},
        ],
        "splits": {"train": {"documents": 176, "bytes": 230_000, "tokens": 52000,
                             "shards": [{"file": "train_000000.bin", "tokens": 52000}]},
                   "val": {"documents": 4, "bytes": 3260, "tokens": 1100,
                           "shards": [{"file": "val_000000.bin", "tokens": 1100}]}},
    })
    atomic_write_json(run / "tokenizer" / "stats.json", {
        "vocab_size": 512, "merges": 250, "special_tokens": 6, "val_bytes": 3520, "val_tokens": 1100,
        "val_bytes_per_token": 3.2, "content_hash": "sha256:abc",
        "longest_tokens": [{"id": 400, "bytes": 9, "text": " the king"}],
    })
    lines = []
    for step in range(1, steps + 1):
        lines.append({"step": step, "tokens": step * 2048, "loss": 6.0 * math.exp(-step / 20) + 2.0,
                      "lr": 3e-3 * min(1.0, step / 10), "tokens_per_s": 9000.0 + step})
        if step % 20 == 0:
            lines.append({"step": step, "val_loss": 6.0 * math.exp(-step / 20) + 2.3, "val_bpb": 1.9})
    text = "".join(json.dumps(r) + "\n" for r in lines) + '{"step": 61, "lo'  # torn by a kill
    (run / "metrics.jsonl").write_text(text, encoding="utf-8")
    atomic_write_json(run / "logs" / "samples.json",
                      [{"prompt": "The", "text": "The king said to his son, and the lord"}])
    atomic_write_json(run / "stages.json", {"version": 1, "stages": {
        "data": {"status": "complete", "seconds": 3.5, "finished_at": "2026-11-21T18:00:00+00:00"},
        "pretrain": {"status": "complete", "seconds": 61.0, "finished_at": "2026-11-21T18:01:00+00:00"},
    }})
    return run


def colourful_pixels(rgb: np.ndarray) -> int:
    """Pixels of a clearly coloured (not grey) shade: the plot lines; text is black or grey."""
    rgb = rgb[..., :3].astype(float)
    if rgb.max() <= 1.0:
        rgb = rgb * 255
    return int(((rgb.max(axis=-1) - rgb.min(axis=-1)) > 60).sum())


def test_report_has_every_section_and_real_plots(tmp_path):
    import matplotlib.image as mpimg

    run = make_run_dir(tmp_path)
    out = build_report(run)
    md = (out / "report.md").read_text(encoding="utf-8")
    page = (out / "report.html").read_text(encoding="utf-8")
    for title in SECTION_TITLES:
        assert f"\n## {title}\n" in md
        assert re.search(rf"<h2 id=\"[^\"]+\">{re.escape(title)}</h2>", page)
    # The facts of the fake run reach the report.
    assert "near dedup" in md and "3.200" in md and "The king said" in md and "9,060" in md
    # Documents kept after each step: 200 read - 12 - 5 - 3 = 180.
    assert "| near dedup | 180 |" in md and "corpus/copy.txt" in md
    assert "1 unreadable line" in md  # the torn last line was skipped, not fatal
    # The parameter count is the real model's.
    from lmforge.model import Transformer

    cfg = load_config(config_file=run / "config.toml")
    n_params = sum(p.numel() for p in Transformer(cfg.model).parameters())
    assert f"| total | {n_params:,} (" in md

    images = re.findall(r'<img src="([^"]+)"', page)
    assert {Path(p).name for p in images} >= {"loss.png", "lr.png", "throughput.png"}
    for rel in images:
        assert f"]({rel})" in md  # Markdown shows the same files
        pixels = mpimg.imread(out / rel)
        assert pixels.shape[0] > 100 and pixels.shape[1] > 100
        assert colourful_pixels(pixels) > 500, f"{rel} looks blank"


def test_pdf_pages_render_with_plots(tmp_path):
    import pypdfium2 as pdfium  # the dev extra: rasterises PDF pages without system tools

    out = build_report(make_run_dir(tmp_path))
    pdf = pdfium.PdfDocument(str(out / "report.pdf"))
    assert len(pdf) >= 2
    pages = [np.asarray(pdf[i].render(scale=2).to_pil().convert("RGB")) for i in range(len(pdf))]
    # The first page is mostly text: dark pixels, no colour.
    dark = (pages[0].mean(axis=-1) < 128).sum()
    assert dark > 2000
    # The plots show up in colour (train loss blue, validation orange, lr purple); text alone
    # leaves no coloured pixel at all.
    assert max(colourful_pixels(p) for p in pages) > 2000
    text = "".join(pdf[i].get_textpage().get_text_range() for i in range(len(pdf)))
    for title in SECTION_TITLES:
        assert title in text


def test_missing_artefacts_give_not_available_sections(tmp_path):
    empty = tmp_path / "empty"  # a run stopped before its first stage finished
    atomic_write_json(empty / "stages.json", {"version": 1, "stages": {}})
    out = build_report(empty)
    md = (out / "report.md").read_text(encoding="utf-8")
    for title in SECTION_TITLES:
        assert f"## {title}" in md
    assert md.count("Not available") >= 6
    assert (out / "report.pdf").stat().st_size > 1000


def test_damaged_artefact_costs_only_its_section(tmp_path):
    run = make_run_dir(tmp_path)
    (run / "data" / "manifest.json").write_text("{ not json", encoding="utf-8")
    md = (build_report(run) / "report.md").read_text(encoding="utf-8")
    data_section = md.split("## Data\n", 1)[1].split("\n## ", 1)[0]
    assert "Not available" in data_section and "JSONDecodeError" in data_section
    assert "loss.png" in md  # the other sections are intact


def test_regenerating_replaces_the_report(tmp_path):
    run = make_run_dir(tmp_path)
    build_report(run)
    (run / "logs" / "samples.json").write_text(json.dumps([{"prompt": "A", "text": "fresh text"}]))
    md = (build_report(run) / "report.md").read_text(encoding="utf-8")
    assert "fresh text" in md and "The king said" not in md
    assert not [p for p in run.iterdir() if p.name.startswith(".report")]  # no temporary leftovers


def test_metrics_reader_skips_torn_lines_and_keeps_the_resumed_steps(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": 1, "loss": 5.0}, {"step": 2, "loss": 4.0}, {"step": 3, "loss": 9.0},
            {"step": 2, "loss": 4.5}, {"step": 3, "loss": 3.5}]  # resumed from step 1
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "[1, 2]\n" + '{"step": 4, "lo')
    metrics = read_metrics(path)
    assert metrics.skipped_lines == 2
    assert metrics.train("loss") == [(1, 5.0), (2, 4.5), (3, 3.5)]
    assert metrics.last("loss") == 3.5 and metrics.last("val_loss") is None


def test_report_command(tmp_path):
    run = make_run_dir(tmp_path)
    ok = subprocess.run([sys.executable, "-m", "lmforge", "report", str(run)],
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert str(run / "report" / "report.html") in ok.stdout
    missing = subprocess.run([sys.executable, "-m", "lmforge", "report", str(tmp_path / "nope")],
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2
    assert missing.stderr.strip().count("\n") == 0 and "run directory not found" in missing.stderr


def add_lifecycle(run: Path) -> Path:
    """The artefacts of the stages after pre-training (lmforge/pipeline/posttrain.py's formats):
    an SFT and a DPO run's metrics, evaluation results of three models, transcripts, an export."""
    cfg = load_config(preset="tiny", overrides=["model.vocab_size=512", "tokenizer.vocab_size=512",
                                                "run.align=dpo"])
    (run / "config.toml").write_text(cfg.to_toml(), encoding="utf-8")
    sft, dpo = [], []
    for step in range(1, 31):
        sft.append({"step": step, "loss": 3.0 * math.exp(-step / 10) + 1.0})
        dpo.append({"step": step, "loss": 0.69 - step / 100, "reward_margin": step / 30,
                    "reward_accuracy": 0.5 + step / 70})
        if step % 10 == 0:  # a held-out accuracy under a name of the stage's own
            dpo.append({"step": step, "heldout_accuracy": 0.1 + step / 100})
        if step % 10 == 0:
            sft.append({"step": step, "val_loss": 3.0 * math.exp(-step / 10) + 1.2})
    for name, rows in (("sft", sft), ("align", dpo)):
        (run / name).mkdir()
        (run / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    def results(acc: float, bpb: float) -> dict:
        return {"checkpoint": "x", "results": {"bpb": {"bpb": bpb, "items": 10},
                                               "arc_easy": {"acc": acc, "acc_norm": acc - 0.01, "items": 100},
                                               "chat": {"acc": acc / 2, "tasks": {"arithmetic": acc, "letters": 0.0}}},
                "core": {"centered": (acc - 0.25) / 0.75, "tasks": {"arc_easy": (acc - 0.25) / 0.75}}}

    atomic_write_json(run / "eval" / "results.json", {
        "tasks": ["bpb", "arc_easy", "piqa"], "limit": 100, "skipped": ["piqa"],
        "models": {"base": results(0.30, 1.9), "sft": results(0.35, 2.0), "aligned": results(0.40, 2.1)}})
    atomic_write_json(run / "logs" / "chat.json", {"checkpoint": "align/checkpoints/step_00000030", "transcripts": [
        {"task": "arithmetic", "messages": [{"role": "user", "content": "What is 2 + 3?"},
                                            {"role": "assistant", "content": "2 + 3 = 5. #### 5"}],
         "reference": "#### 5", "correct": True}]})
    atomic_write_json(run / "export" / "export.json", {
        "checkpoint": "align/checkpoints/step_00000030", "formats": ["hf", "gguf"],
        "files": {"hf/model.safetensors": 5_300_000, "model.gguf": 2_700_000}})
    return run


def test_lifecycle_sections_show_curves_the_evaluation_table_and_transcripts(tmp_path):
    import matplotlib.image as mpimg

    run = add_lifecycle(make_run_dir(tmp_path))
    out = build_report(run)
    md = (out / "report.md").read_text(encoding="utf-8")
    # Base, SFT and aligned side by side; chance of a 4-way choice; GPT-3 Small's published ARC-Easy
    # zero-shot accuracy (Brown et al. 2020, table H.1); CORE centred by chance.
    assert "| task | metric | chance | base (pre-trained) | SFT | aligned | GPT-3 Small (125M), 0-shot |" in md
    assert "| arc_easy | acc | 0.250 | 0.300 | 0.350 | 0.400 | 0.436 |" in md
    assert "| bpb | bpb | - | 1.900 | 2.000 | 2.100 | - |" in md
    # The chat task's mean, then each of its generators.
    assert "| chat | acc | - | 0.150 | 0.175 | 0.200 | - |" in md
    assert "| chat: arithmetic | acc | - | 0.300 | 0.350 | 0.400 | - |" in md
    assert "| chat: letters | acc | - | 0.000 | 0.000 | 0.000 | - |" in md
    assert f"| CORE (centred mean) | centred acc | 0 | {0.05 / 0.75:.3f} |" in md
    assert "Not evaluated, the time budget being spent before they started: piqa." in md
    assert "| held-out chat questions answered right (transcripts) | 1 of 1 |" in md
    assert "user: What is 2 + 3?" in md and "arithmetic (right)" in md
    assert "| model.gguf | 2.7 MB |" in md
    for plot in ("sft_loss.png", "align_loss.png", "align_reward_margin.png", "align_reward_accuracy.png",
                 "align_heldout_accuracy.png"):
        assert f"](plots/{plot})" in md
        assert colourful_pixels(mpimg.imread(out / "plots" / plot)) > 500, plot
    # Ordered for a reader: outcome first, the config in the appendix.
    titles = re.findall(r"^## (.+)$", md, flags=re.M)
    assert titles[:3] == ["Summary", "Evaluation", "Pre-training"]
    assert titles.index("Appendix: configuration") > titles.index("Data")
    assert "| 10 | " in md.split("## Appendix: per-step tables", 1)[1]  # SFT's evaluations


def test_the_pdf_shows_a_plot_before_the_config(tmp_path):
    import pypdfium2 as pdfium

    out = build_report(add_lifecycle(make_run_dir(tmp_path)))
    pdf = pdfium.PdfDocument(str(out / "report.pdf"))
    texts = [pdf[i].get_textpage().get_text_range() for i in range(len(pdf))]
    first_plot = next(i for i in range(len(pdf))
                      if colourful_pixels(np.asarray(pdf[i].render(scale=2).to_pil().convert("RGB"))) > 2000)
    config_page = next(i for i, t in enumerate(texts) if "Appendix: configuration" in t and "[model]" in t)
    assert first_plot <= 1 < config_page
    assert "Evaluation" in texts[0]


def test_evaluation_section_has_the_results_table_and_the_curves(tmp_path):
    import matplotlib.image as mpimg

    run = make_run_dir(tmp_path, steps=40)
    # train.eval_tasks rows, as the loop logs them beside val_loss.
    with open(run / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write("\n" + "".join(json.dumps({"step": s, "val_loss": 2.5, "eval/arc_easy/acc": s / 100,
                                           "eval/arc_easy/acc_norm": s / 200}) + "\n"
                               for s in (10, 20, 30)))
    for step, acc in ((20, 0.3125), (40, 0.4375)):  # lmforge eval of two checkpoints
        atomic_write_json(run / "eval" / f"step_{step:08d}.json", {
            "results": {"arc_easy": {"acc": acc, "acc_norm": 0.5, "stderr": 0.05, "items": 16, "shots": 0},
                        "humaneval": {"pass@1": 0.0625, "stderr": 0.06, "items": 16, "shots": 0}},
            "core": {"centered": 0.25, "tasks": {"arc_easy": 0.25}}})
    out = build_report(run)
    md = (out / "report.md").read_text(encoding="utf-8")
    section = md.split("\n## Evaluation\n")[1].split("\n## ")[0]
    assert "| arc_easy | acc | 0.4375 | 0.05 | 16 | 0 | base |" in section  # the newest checkpoint
    assert "| humaneval | pass@1 | 0.0625 |" in section and "CORE" in section and "0.2500" in section
    assert "| arc_easy acc | 0.3125 | 0.4375 |" in section  # across checkpoints, in step order
    assert "| arc_easy/acc | 0.3000 |" in section  # the last logged value during training
    pixels = mpimg.imread(out / "plots" / "eval.png")
    assert colourful_pixels(pixels) > 500


def test_evaluation_section_says_where_results_would_be(tmp_path):
    out = build_report(make_run_dir(tmp_path))
    md = (out / "report.md").read_text(encoding="utf-8")
    assert "No benchmark results yet" in md.split("\n## Evaluation\n")[1].split("\n## ")[0]
