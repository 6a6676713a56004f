"""The pipeline driver on stand-in stages (fast): skip when unchanged, rerun a changed stage and
everything after it, redo a stage whose outputs went missing, and retry an interrupted one; never
lose a finished stage's outputs (kept aside when redone, a too small budget refused up front)."""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path

import pytest

from lmforge.config import load_config
from lmforge.errors import UserError
from lmforge.hashing import file_sha256
from lmforge.pipeline import run as pipeline
from lmforge.pipeline.layout import RunLayout
from lmforge.pipeline.records import StageRecords
from lmforge.pipeline.stage import DRIVER_RESERVE_S, FIXED_COST_S, Context


def fake_stages(calls: list[str], fail_in: set[str],
                names: tuple[str, str, str] = ("a", "b", "c")) -> list[pipeline.Stage]:
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
            run, lambda ctx: file_sha256(output(ctx)) if output(ctx).is_file() else None,
            lambda layout: [layout.root / f"{name}.txt"])

    a, b, c = names
    return [make(a, (), "data.val_fraction"), make(b, (a,), "tokenizer.vocab_size"),
            make(c, (b,), "train.max_steps")]


def run_in(root: Path, *overrides: str, budget_s: float | None = None) -> None:
    cfg = load_config(preset="tiny", overrides=list(overrides))
    pipeline.run_pipeline(cfg, root, budget_s=budget_s, progress=False, log=lambda line: None)


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


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


def test_a_redone_stage_keeps_its_previous_outputs(driver):
    run, _, root = driver
    run()
    old = (root / "c.txt").read_text()
    assert run("train.max_steps=7") == ["c"]
    assert (root / "c.txt").read_text() == "a=0.01;b=4096;c=7;"
    [kept] = (root / "previous").iterdir()
    assert kept.name.startswith("c-") and (kept / "c.txt").read_text() == old
    note = json.loads((kept / pipeline.PREVIOUS_NOTE).read_text())
    assert note["stage"] == "c" and note["record"]["status"] == "complete"
    assert "max_steps = 1000" in (kept / "config.toml").read_text()  # the config it was made with
    # A change further up keeps every redone stage's outputs, each in its own folder, one per
    # stage: c's newer previous outputs replace the older ones.
    newer = (root / "c.txt").read_text()
    assert run("train.max_steps=7", "tokenizer.vocab_size=512") == ["b", "c"]
    assert sorted(p.name.split("-")[0] for p in (root / "previous").iterdir()) == ["b", "c"]
    [kept_c] = (root / "previous").glob("c-*")
    assert (kept_c / "c.txt").read_text() == newer != old


def test_a_budget_too_small_is_refused_before_anything_is_touched(tmp_path, monkeypatch):
    calls: list[str] = []
    # The budget is about training: a stand-in "pretrain" stage (depending on tokenizer.vocab_size).
    monkeypatch.setattr(pipeline, "STAGES", fake_stages(calls, set(), ("data", "pretrain", "sample")))
    root = tmp_path / "run"
    # pretrain's least time, the estimate for sample (never measured), the driver's reserve.
    need = load_config(preset="tiny").run.min_stage_s + FIXED_COST_S["sample"] + DRIVER_RESERVE_S
    smallest = math.ceil(need / 10) * 10
    small = smallest - 10
    with pytest.raises(UserError, match=f"--time-budget {small}s is too small .* give --time-budget {smallest}s"):
        run_in(root, budget_s=small)
    assert not root.exists() and calls == []

    run_in(root)  # no budget: every stage runs
    before = snapshot(root)
    # sample is measured now (a few milliseconds): the smallest budget is about pretrain alone.
    measured = json.loads((root / "stages.json").read_text())["stages"]["sample"]["seconds"]
    smallest = math.ceil((need - FIXED_COST_S["sample"] + measured) / 10) * 10
    with pytest.raises(UserError, match=rf"stages left \(pretrain, sample\).* give --time-budget {smallest}s"):
        run_in(root, "tokenizer.vocab_size=512", budget_s=smallest - 10)
    assert snapshot(root) == before  # nothing moved, removed or rewritten (config.toml included)
    calls.clear()
    run_in(root, "tokenizer.vocab_size=512", budget_s=smallest)  # the smallest it named works
    assert calls == ["pretrain", "sample"]


def test_until_runs_a_prefix_and_the_rest_later(driver, tmp_path):
    run, _, root = driver
    cfg = load_config(preset="tiny")
    pipeline.run_pipeline(cfg, root, budget_s=None, progress=False, log=lambda line: None, until="b")
    assert sorted(p.name for p in root.glob("*.txt")) == ["a.txt", "b.txt"]
    assert run() == ["c"]  # the stages before are finished and skipped
    with pytest.raises(UserError, match="--until z: no such stage; the stages are a, b, c"):
        pipeline.run_pipeline(cfg, root, budget_s=None, progress=False, log=lambda line: None, until="z")


def budget_context(left: list[str], remaining: float, *overrides: str) -> Context:
    """A context with `remaining` seconds left on a clock that stands still."""
    cfg = load_config(preset="tiny", overrides=list(overrides))
    ctx = Context(cfg, RunLayout(Path("unused")), budget_s=remaining, started=time.monotonic(),
                  progress=False, left=left)
    ctx.estimates = {"eval": 100.0, "report": 20.0}
    ctx.remaining_s = lambda: remaining
    return ctx


def test_the_budget_is_split_among_the_training_stages_by_their_shares():
    left = ["pretrain", "sft", "align", "eval", "report"]
    ctx = budget_context(left, 1120.0, "run.pretrain_share=0.5", "run.sft_share=0.3",
                         "run.align_share=0.2")
    # 1,000 s after the untrained stages' 120 s; pretrain's share is half of it.
    assert ctx.stage_budget_s("pretrain") == pytest.approx(500.0)
    ctx.left = left[1:]  # pretrain done: sft gets 0.3 of the 0.5 share left
    assert ctx.stage_budget_s("sft") == pytest.approx(1000.0 * 0.3 / 0.5)
    ctx.left = left[2:]
    assert ctx.stage_budget_s("align") == pytest.approx(1000.0)
    # Without alignment its share goes to the others.
    none = budget_context(left, 1120.0, "run.align=none", "run.pretrain_share=0.5",
                          "run.sft_share=0.3")
    assert none.stage_budget_s("pretrain") == pytest.approx(1000.0 * 0.5 / 0.8)
    # Never below the minimum.
    tight = budget_context(left, 130.0, "run.min_stage_s=40")
    assert tight.stage_budget_s("pretrain") == 40.0


def test_a_directory_that_is_not_a_run_is_refused(tmp_path):
    root = tmp_path / "mine"
    root.mkdir()
    (root / "notes.txt").write_text("x")
    with pytest.raises(UserError, match="not a run directory"):
        run_in(root)
    assert snapshot(root) == {"notes.txt": b"x"}


def test_a_lifecycle_run_resolves_to_its_final_model(tmp_path):
    from lmforge.checkpoint import resolve_checkpoint

    run = tmp_path / "run"

    def checkpoint(stage_dir: Path, step: int, complete: bool = True) -> Path:
        path = stage_dir / "checkpoints" / f"step_{step:08d}"
        path.mkdir(parents=True)
        (path / "config.json").write_text("{}")
        if complete:
            (path / "COMPLETE").write_text("")
        return path

    base = checkpoint(run, 40)
    checkpoint(run, 30)
    assert resolve_checkpoint(run) == base  # no stages.json: a plain pre-training run
    (run / "stages.json").write_text("{}")
    assert resolve_checkpoint(run) == base
    checkpoint(run / "sft", 9, complete=False)  # an unfinished SFT checkpoint is never the model
    assert resolve_checkpoint(run) == base
    sft = checkpoint(run / "sft", 8)
    assert resolve_checkpoint(run) == sft
    aligned = checkpoint(run / "align", 5)
    assert resolve_checkpoint(run) == aligned
    assert resolve_checkpoint(run / "sft") == sft  # a stage's own run directory still works


def test_the_align_and_export_stages_call_their_functions_with_the_agreed_signatures(tmp_path, monkeypatch):
    """run_dpo(cfg, checkpoint, run_dir, resume) and export_gguf(checkpoint, out, dtype) as
    stand-ins: what the stages pass them, and what they make of the results."""
    from types import SimpleNamespace

    from lmforge.checkpoint import resolve_checkpoint
    from lmforge.pipeline import posttrain

    def fake_checkpoint(directory: Path) -> Path:
        directory.mkdir(parents=True)
        for name in ("config.json", "COMPLETE", "model.safetensors"):
            (directory / name).write_text(name)
        return directory

    calls: dict[str, tuple] = {}

    def run_dpo(cfg, checkpoint, run_dir, resume=False):
        calls["dpo"] = (cfg, checkpoint, run_dir, resume)
        fake_checkpoint(Path(run_dir) / "checkpoints" / "step_00000002")
        return SimpleNamespace(stopped_by_signal=False, signal=None)

    def export_gguf(checkpoint, out, dtype="f16"):
        calls["gguf"] = (checkpoint, out, dtype)
        Path(out).write_bytes(b"GGUF")
        return Path(out)

    fakes = {("lmforge.align.dpo", "run_dpo"): run_dpo, ("lmforge.interop.gguf", "export_gguf"): export_gguf}
    real_function = posttrain._function  # still reads the stages' train / guard defaults
    monkeypatch.setattr(posttrain, "_function",
                        lambda module, name: fakes.get((module, name)) or real_function(module, name))
    cfg = load_config(preset="tiny", overrides=[
        "run.align=dpo", "run.export=gguf", 'run.align_overrides=["train.max_steps=7"]'])
    root = tmp_path / "run"
    (root).mkdir()
    (root / "stages.json").write_text("{}")
    sft = fake_checkpoint(root / "sft" / "checkpoints" / "step_00000005")
    ctx = Context(cfg, RunLayout(root), budget_s=1000.0, started=time.monotonic(), progress=False,
                  left=["align", "eval", "report"], estimates={"eval": 100.0, "report": 20.0})
    ctx.remaining_s = lambda: 1000.0  # a clock that stands still

    posttrain.run_align(ctx)
    stage_cfg, checkpoint, run_dir, resume = calls["dpo"]
    assert (checkpoint, run_dir, resume) == (sft, root / "align", False)
    from lmforge.align.dpo import DPO_TRAIN_DEFAULTS, PREFERENCE_GUARD_DEFAULTS

    # Its override on top of what `lmforge dpo` starts from (not the pre-training settings).
    assert stage_cfg.train.max_steps == 7 and stage_cfg.train.lr == DPO_TRAIN_DEFAULTS["lr"] != cfg.train.lr
    assert stage_cfg.guard.min_abs_spread == PREFERENCE_GUARD_DEFAULTS["min_abs_spread"]
    assert stage_cfg.train.time_budget == "880s"  # all that the untrained stages leave
    assert posttrain.align_fingerprint(ctx) is not None
    assert resolve_checkpoint(root) == root / "align" / "checkpoints" / "step_00000002"

    posttrain.run_export(ctx)
    aligned = root / "align" / "checkpoints" / "step_00000002"
    assert calls["gguf"][0] == aligned and calls["gguf"][2] == "f16"
    note = json.loads((root / "export" / "export.json").read_text())
    assert note["checkpoint"] == "align/checkpoints/step_00000002" and note["files"] == {"model.gguf": 4}


def test_a_missing_alignment_or_export_module_is_refused_up_front(tmp_path, monkeypatch):
    from lmforge.pipeline import posttrain

    monkeypatch.setattr(posttrain, "ALIGN_TRAINERS", {"dpo": ("lmforge.not_here.dpo", "run_dpo")})
    monkeypatch.setattr(posttrain, "GGUF_EXPORTER", ("lmforge.interop.not_here", "export_gguf"))
    cfg = load_config(preset="tiny", overrides=["run.align=dpo", "run.export=hf"])
    with pytest.raises(UserError, match=r"run.align=dpo needs lmforge.not_here.dpo"):
        posttrain.check_available(cfg, ["pretrain", "sft", "align"])
    posttrain.check_available(cfg, ["pretrain", "sft"])  # --until sft: alignment is not asked for
    cfg = load_config(preset="tiny", overrides=["run.align=none", "run.export=hf,gguf"])
    with pytest.raises(UserError, match=r"run.export=gguf needs lmforge.interop.not_here"):
        posttrain.check_available(cfg, ["export"])
    with pytest.raises(UserError, match="run.align=dpo needs"):  # before anything is written
        run_in(tmp_path / "run", "run.align=dpo")
    assert not (tmp_path / "run").exists()


def test_a_mistake_in_a_later_stage_settings_is_refused_before_the_first_stage(tmp_path):
    cases = [("run.chat_tasks=arithmetic,riddles", "run.chat_tasks: unknown task 'riddles'"),
             ('run.sft_overrides=["train.nope=1"]', "run.sft_overrides: --set: unknown config key 'train.nope'"),
             ('run.sft_overrides=["model.n_layers=9"]', "run.sft_overrides: a fine-tuning stage keeps"),
             ("run.eval_tasks=bpb,trivia", "unknown task 'trivia'")]
    for override, message in cases:
        with pytest.raises(UserError, match=re.escape(message)):
            run_in(tmp_path / "run", "run.align=none", "run.export=hf", override)
        assert not (tmp_path / "run").exists()


class FakeClock:
    """time.monotonic for the driver and the budget split: it moves only when a stage says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def budgeted(tmp_path, monkeypatch):
    """The stand-in stages as pretrain -> sft -> align on a fake clock: each records the seconds
    the split gives it and then takes `use[name]` of them (all by default)."""
    from types import SimpleNamespace

    from lmforge.pipeline import stage as stage_module

    clock = FakeClock()
    fake_time = SimpleNamespace(monotonic=clock.monotonic)
    monkeypatch.setattr(pipeline, "time", fake_time)
    monkeypatch.setattr(stage_module, "time", fake_time)
    given: dict[str, float] = {}
    use: dict[str, float] = {}
    stop_in: set[str] = set()
    stages = fake_stages([], set(), names=("pretrain", "sft", "align"))

    def timed(stage: pipeline.Stage) -> pipeline.Stage:
        def run(ctx) -> None:
            seconds = ctx.stage_budget_s(stage.name)
            given[stage.name] = seconds
            clock.now += seconds * use.get(stage.name, 1.0)
            if stage.name in stop_in:  # interrupted after using that much
                raise KeyboardInterrupt
            stage.run(ctx)

        return pipeline.Stage(stage.name, stage.after, stage.config, run, stage.fingerprint, stage.outputs)

    monkeypatch.setattr(pipeline, "STAGES", [timed(s) for s in stages])

    def run(*overrides: str) -> dict[str, float]:
        given.clear()
        run_in(tmp_path / "run", "run.pretrain_share=0.5", "run.sft_share=0.3", "run.align_share=0.2",
               *overrides, budget_s=1000.0)
        return dict(given)

    return run, use, stop_in


def test_a_stage_redone_alone_gets_its_share_not_the_time_of_the_stages_finished_before(budgeted):
    run, _, _ = budgeted
    assert run() == pytest.approx({"pretrain": 500.0, "sft": 300.0, "align": 200.0})
    # Only alignment's settings changed: pre-training and SFT are skipped, and alignment gets its
    # share (it used to get the whole budget they no longer needed).
    assert run("train.max_steps=7") == pytest.approx({"align": 200.0})
    # SFT redone: SFT and alignment as in the first run.
    assert run("train.max_steps=7", "tokenizer.vocab_size=600") == pytest.approx(
        {"sft": 300.0, "align": 200.0})


def test_a_stage_that_ends_early_leaves_its_time_to_the_next_in_the_same_invocation(budgeted):
    run, use, _ = budgeted
    use["pretrain"] = 0.5  # 250 s of its 500 s left over: split among SFT and alignment by share
    assert run() == pytest.approx({"pretrain": 500.0, "sft": 750.0 * 0.3 / 0.5, "align": 300.0})
    use.clear()
    # A later invocation redoing alignment alone gets its share, not that leftover.
    assert run("train.max_steps=7") == pytest.approx({"align": 200.0})


def test_a_continued_stage_gets_its_share_less_what_its_earlier_attempts_spent(budgeted):
    run, use, stop_in = budgeted
    use["sft"] = 0.25
    stop_in.add("sft")
    with pytest.raises(KeyboardInterrupt):
        run()  # SFT stopped after 75 of its 300 s
    stop_in.clear()
    use.clear()
    assert run() == pytest.approx({"sft": 300.0 - 75.0, "align": 200.0})


def test_evaluation_stops_starting_tasks_when_the_later_stages_need_the_rest_of_the_budget(tmp_path, monkeypatch):
    """Each task runs on every model before the next one starts; once the run's end less the later
    stages' estimates (and the driver's reserve) is reached, the tasks left are skipped for all
    models alike and listed. Evaluation is a stand-in that takes 100 s of a fake clock a call."""
    from types import SimpleNamespace

    import lmforge.eval.cli as eval_cli
    import lmforge.eval.generation as eval_generation
    import lmforge.eval.runner as eval_runner
    from lmforge.pipeline import posttrain
    from lmforge.pipeline import stage as stage_module

    clock = FakeClock()
    fake_time = SimpleNamespace(monotonic=clock.monotonic)
    monkeypatch.setattr(posttrain, "time", fake_time)
    monkeypatch.setattr(stage_module, "time", fake_time)
    root = tmp_path / "run"
    labels = ("base", "sft", "aligned")
    monkeypatch.setattr(posttrain, "stage_models",
                        lambda ctx: {label: root / label / "step_1" for label in labels})
    monkeypatch.setattr(eval_cli, "load_for_eval", lambda checkpoint: (checkpoint.parent.name, None))
    # `--format auto` as the eval command resolves it: here, chat for every fine-tuned model.
    monkeypatch.setattr(eval_generation, "resolve_format",
                        lambda requested, checkpoint, tok: "base" if checkpoint.parent.name == "base" else "chat")
    calls: list[tuple[str, str]] = []

    def evaluate(model, tokenizer, tasks, options):
        (task,) = tasks
        calls.append((task, model))
        assert options.format == ("base" if model == "base" else "chat")
        clock.now += 100.0
        return {"results": {task: {"acc": 0.5, "items": 4}}, "core": None}

    monkeypatch.setattr(eval_runner, "evaluate", evaluate)
    tasks = ["chat", "bpb", "arc_easy", "piqa", "boolq"]
    cfg = load_config(preset="tiny", overrides=[f"run.eval_tasks={','.join(tasks)}", "run.eval_limit=4"])
    later = {"chat": 20.0, "export": 15.0, "report": 25.0}
    ctx = Context(cfg, RunLayout(root), budget_s=1000.0, started=clock.now, progress=False,
                  left=["eval", *later], estimates={"eval": 150.0, **later})
    root.mkdir()

    posttrain.run_eval(ctx)
    # The deadline is 1000 - 60 - reserve s away: tasks start at 0, 300, 600 and 900 s, the fifth
    # would start at 1200 s.
    assert 900 < 1000 - sum(later.values()) - DRIVER_RESERVE_S < 1200
    assert calls == [(task, label) for task in tasks[:4] for label in labels]
    saved = json.loads((root / "eval" / "results.json").read_text())
    assert saved["skipped"] == ["boolq"]
    assert all(list(saved["models"][label]["results"]) == tasks[:4] for label in labels)
    assert saved["models"]["base"]["core"]["tasks"].keys() == {"arc_easy", "piqa"}


def test_evaluation_without_a_budget_runs_every_task(tmp_path, monkeypatch):
    import lmforge.eval.cli as eval_cli
    import lmforge.eval.generation as eval_generation
    import lmforge.eval.runner as eval_runner
    from lmforge.pipeline import posttrain

    root = tmp_path / "run"
    root.mkdir()
    monkeypatch.setattr(posttrain, "stage_models", lambda ctx: {"base": root / "base" / "step_1"})
    monkeypatch.setattr(eval_cli, "load_for_eval", lambda checkpoint: (None, None))
    monkeypatch.setattr(eval_generation, "resolve_format", lambda requested, checkpoint, tok: "base")
    monkeypatch.setattr(eval_runner, "evaluate",
                        lambda model, tok, tasks, options: {"results": {tasks[0]: {"bpb": 2.0}}})
    cfg = load_config(preset="tiny", overrides=["run.eval_tasks=chat,bpb"])
    ctx = Context(cfg, RunLayout(root), budget_s=None, started=time.monotonic(), progress=False,
                  left=["eval", "report"])
    posttrain.run_eval(ctx)
    saved = json.loads((root / "eval" / "results.json").read_text())
    assert saved["skipped"] == [] and list(saved["models"]["base"]["results"]) == ["chat", "bpb"]


def test_a_stage_model_is_the_checkpoint_its_run_selected_else_the_newest(tmp_path):
    """The lifecycle evaluates and exports an alignment run's selected checkpoint (selected.json),
    and a run without one by its newest checkpoint; resuming always starts from the newest."""
    from lmforge.pipeline.posttrain import latest_checkpoint, stage_model

    for step in (0, 4, 8):
        (tmp_path / "checkpoints" / f"step_{step:08d}").mkdir(parents=True)
        (tmp_path / "checkpoints" / f"step_{step:08d}" / "COMPLETE").write_text("")
    assert stage_model(tmp_path) == latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step_00000008"
    (tmp_path / "checkpoints" / "selected.json").write_text(json.dumps({"step": 4, "metric": "pass_at_1",
                                                                         "value": 0.5}))
    assert stage_model(tmp_path) == tmp_path / "checkpoints" / "step_00000004"
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step_00000008"


def test_a_write_killed_before_its_rename_is_never_the_run_s_model(tmp_path):
    """SIGKILL between a checkpoint's COMPLETE marker and the rename of its temporary directory
    leaves `.step_N.XXXX.tmp` holding the marker (lmforge/atomic.py): loading the run directory,
    the lifecycle's stage model and resuming all take the newest renamed checkpoint instead."""
    from lmforge.checkpoint import resolve_checkpoint
    from lmforge.pipeline.posttrain import latest_checkpoint, stage_model

    for name in ("step_00000004", "step_00000008", ".step_00000012.k3j9x_.tmp"):
        (tmp_path / "checkpoints" / name).mkdir(parents=True)
        (tmp_path / "checkpoints" / name / "COMPLETE").write_text("")
    newest = tmp_path / "checkpoints" / "step_00000008"
    assert resolve_checkpoint(tmp_path) == stage_model(tmp_path) == latest_checkpoint(tmp_path) == newest
