"""The pipeline driver on stand-in stages (fast): skip when unchanged, rerun a changed stage and
everything after it, redo a stage whose outputs went missing, and retry an interrupted one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmforge.config import load_config
from lmforge.hashing import file_sha256
from lmforge.pipeline import run as pipeline
from lmforge.pipeline.records import StageRecords


def fake_stages(calls: list[str], fail_in: set[str]) -> list[pipeline.Stage]:
    """Three stages: each writes a file from its config field and the previous stage's file."""

    def make(name: str, after: tuple[str, ...], field: str) -> pipeline.Stage:
        def output(ctx) -> Path:
            return ctx.layout.root / f"{name}.txt"

        def run(ctx) -> None:
            calls.append(name)
            if name in fail_in:
                raise KeyboardInterrupt
            before = (ctx.layout.root / f"{after[0]}.txt").read_text() if after else ""
            section, key = field.split(".")
            output(ctx).write_text(f"{before}{name}={getattr(getattr(ctx.cfg, section), key)};")

        return pipeline.Stage(
            name, after, lambda ctx: getattr(getattr(ctx.cfg, field.split(".")[0]), field.split(".")[1]),
            run, lambda ctx: file_sha256(output(ctx)) if output(ctx).is_file() else None)

    return [make("a", (), "data.val_fraction"), make("b", ("a",), "tokenizer.vocab_size"),
            make("c", ("b",), "train.max_steps")]


@pytest.fixture
def driver(tmp_path, monkeypatch):
    calls: list[str] = []
    fail_in: set[str] = set()
    monkeypatch.setattr(pipeline, "STAGES", fake_stages(calls, fail_in))

    def run(*overrides: str) -> list[str]:
        calls.clear()
        cfg = load_config(preset="tiny", overrides=list(overrides))
        pipeline.run_pipeline(cfg, tmp_path / "run", budget_s=None, progress=False, log=lambda line: None)
        return list(calls)

    return run, fail_in, tmp_path / "run"


def test_unchanged_stages_are_skipped(driver):
    run, _, root = driver
    assert run() == ["a", "b", "c"]
    assert run() == []
    assert (root / "c.txt").read_text() == "a=0.01;b=4096;c=1000;"
    assert json.loads((root / "stages.json").read_text())["stages"]["c"]["status"] == "complete"
    assert (root / "config.toml").is_file()


def test_a_change_reruns_its_stage_and_everything_after_it(driver):
    run, _, root = driver
    run()
    assert run("tokenizer.vocab_size=512") == ["b", "c"]
    assert run("tokenizer.vocab_size=512", "train.max_steps=7") == ["c"]
    assert run("tokenizer.vocab_size=512", "train.max_steps=7", "data.val_fraction=0.2") == ["a", "b", "c"]
    assert (root / "c.txt").read_text() == "a=0.2;b=512;c=7;"


def test_missing_outputs_are_rebuilt(driver):
    run, _, root = driver
    run()
    (root / "b.txt").unlink()
    # b is redone; it makes the same output from the same inputs, so c (built on it) stays valid.
    assert run() == ["b"]
    (root / "c.txt").write_text("tampered")
    assert run() == ["c"]


def test_an_interrupted_stage_is_retried_and_the_ones_before_it_kept(driver):
    run, fail_in, root = driver
    fail_in.add("b")
    with pytest.raises(KeyboardInterrupt):
        run()
    records = StageRecords(root / "stages.json")
    assert records.get("a")["status"] == "complete" and records.get("b")["status"] == "running"
    assert records.get("c") is None
    fail_in.clear()
    assert run() == ["b", "c"]
    assert StageRecords(root / "stages.json").get("b")["attempts"] == 2
