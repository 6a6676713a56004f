"""`lmforge run` end to end on a small generated corpus and a tiny model: the whole lifecycle
(data, tokenizer, shards, pre-training, SFT, evaluation, samples, chat transcripts, export, report),
every artefact and report section, every stage skipped when unchanged, a changed config rerunning its
stage and everything after it (and nothing before), and interrupted runs (SIGINT, then SIGKILL)
that continue to the same artefacts. Alignment is off here (run.align = "none"); its own tests
cover DPO and GRPO."""

from __future__ import annotations

import json
import math
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lmforge.report.collect import SECTIONS

pytestmark = pytest.mark.slow

STAGE_NAMES = ["data", "tokenizer", "shards", "pretrain", "sft", "align", "eval", "sample", "chat",
               "export", "report"]
# A model of ~40K parameters on ~70K tokens: seconds per stage on two cores.
TINY = [
    "model.vocab_size=384", "tokenizer.vocab_size=384", "model.d_model=32", "model.n_layers=2",
    "model.n_heads=2", "model.n_kv_heads=1", "model.max_seq_len=64", "train.batch_size=8",
    "train.max_steps=40", "train.warmup_steps=5", "train.eval_every=10", "train.checkpoint_every=10",
    "train.eval_batches=2", "train.tensorboard=false", "data.workers=1", "data.val_fraction=0.03",
]
# The stages after pre-training, as small: a few SFT steps on the conversations make_corpus writes,
# a few DPO steps on its preference pairs, bits per byte and the `chat` tasks, two transcripts, the
# HF and GGUF exports.
LIFECYCLE = [
    "sft.val_fraction=0.1", "dpo.val_fraction=0.1", "run.align=dpo", "run.export=hf,gguf",
    "run.eval_tasks=bpb,chat", "run.eval_limit=4", "run.chat_tasks=arithmetic", "run.chat_questions=2",
    'run.sft_overrides=["train.max_steps=8", "train.batch_size=4", "train.eval_every=4", '
    '"train.checkpoint_every=4", "train.eval_batches=2"]',
    'run.align_overrides=["train.max_steps=4", "train.batch_size=4", "train.eval_every=2", '
    '"train.checkpoint_every=2", "train.eval_batches=1"]',
]


def make_corpus(root: Path, docs: int = 240, seed: int = 0) -> Path:
    """Documents of random sentences from a small grammar: they pass the quality filters."""
    rng = random.Random(seed)
    nouns = ("king queen river forest castle garden sword letter window mountain village merchant "
             "sailor child horse bridge candle winter summer harvest").split()
    verbs = "found watched carried followed painted crossed opened remembered praised guarded".split()
    adjectives = "quiet golden ancient bright narrow gentle wild distant hollow silver proud".split()
    places = "near under beyond beside across behind".split()
    corpus = root / "corpus"
    corpus.mkdir()
    for d in range(docs):
        sentences = [f"The {rng.choice(adjectives)} {rng.choice(nouns)} {rng.choice(verbs)} the "
                     f"{rng.choice(nouns)} {rng.choice(places)} the {rng.choice(adjectives)} "
                     f"{rng.choice(nouns)}." for _ in range(rng.randint(12, 20))]
        (corpus / f"doc{d:04d}.txt").write_text(" ".join(sentences) + "\n", encoding="utf-8")
    conversations = []
    for _ in range(60):  # SFT data, next to the corpus (not in it: it is no pre-training text)
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        conversations.append({"messages": [{"role": "user", "content": f"What is {a} + {b}?"},
                                           {"role": "assistant", "content": f"#### {a + b}"}]})
    (root / "chat.jsonl").write_text("".join(json.dumps(c) + "\n" for c in conversations))
    pairs = []
    for _ in range(60):  # DPO data: the right sum preferred to a wrong one
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        pairs.append({"prompt": f"What is {a} + {b}?", "chosen": f"#### {a + b}",
                      "rejected": f"#### {a + b + rng.randint(1, 3)}"})
    (root / "prefs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    return corpus


def run_command(out: Path, corpus: Path, *overrides: str) -> list[str]:
    lifecycle = [*LIFECYCLE, f"sft.data={corpus.parent / 'chat.jsonl'}",
                 f"dpo.data={corpus.parent / 'prefs.jsonl'}"]
    sets = [arg for item in [*TINY, *lifecycle, *overrides] for arg in ("--set", item)]
    return [sys.executable, "-m", "lmforge", "run", "--source", str(corpus), "--out", str(out),
            "--time-budget", "none", *sets]


def lmforge_run(out: Path, corpus: Path, *overrides: str) -> subprocess.CompletedProcess:
    done = subprocess.run(run_command(out, corpus, *overrides), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def records(run: Path) -> dict:
    return json.loads((run / "stages.json").read_text())["stages"]


def stage_lines(stdout: str) -> dict[str, str]:
    """Stage name -> its last status line ("[4/11]  pretrain  skipped: ...")."""
    lines = {}
    for line in stdout.splitlines():
        parts = line.split()
        if line.startswith("[") and len(parts) > 2 and parts[1] in STAGE_NAMES:
            lines[parts[1]] = " ".join(parts[2:])
    return lines


def final_weights(run: Path) -> dict:
    from safetensors.torch import load_file

    checkpoints = sorted(p for p in (run / "checkpoints").iterdir() if (p / "COMPLETE").exists())
    return load_file(str(checkpoints[-1] / "model.safetensors"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("text"))


@pytest.fixture(scope="module")
def finished(tmp_path_factory, corpus) -> tuple[Path, str]:
    """One complete run, shared by the tests that only read it."""
    run = tmp_path_factory.mktemp("runs") / "tiny"
    return run, lmforge_run(run, corpus).stdout


def test_run_writes_every_artefact_and_the_report(finished):
    run, stdout = finished
    assert f"report: {run / 'report' / 'report.html'}" in stdout
    manifest = json.loads((run / "data" / "manifest.json").read_text())
    for split in ("train", "val"):
        assert manifest["splits"][split]["tokens"] > 0
        for shard in manifest["splits"][split]["shards"]:
            assert (run / "data" / shard["file"]).is_file()
    assert (run / "tokenizer" / "tokenizer.json").is_file()
    assert json.loads((run / "tokenizer" / "stats.json").read_text())["val_bytes_per_token"] > 1.5
    assert (run / "checkpoints" / "step_00000040" / "COMPLETE").is_file()
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    val = [m["val_loss"] for m in metrics if "val_loss" in m]
    # Learning happened: from about ln(vocab) = 5.95 at the start to well below it.
    assert len(val) == 4 and val[-1] < val[0] - 0.5 and val[-1] < 5.0
    samples = json.loads((run / "logs" / "samples.json").read_text())
    assert any(s["prompt"] == "The" and s["text"].startswith("The") for s in samples)
    assert all(r["status"] == "complete" for r in records(run).values())
    assert list(records(run)) == STAGE_NAMES

    # After pre-training: the SFT run learned the conversations' format ...
    sft = [json.loads(line) for line in (run / "sft" / "metrics.jsonl").read_text().splitlines()]
    sft_val = [m["val_loss"] for m in sft if "val_loss" in m]
    assert len(sft_val) == 2 and sft_val[-1] < sft_val[0]
    assert (run / "sft" / "checkpoints" / "step_00000008" / "COMPLETE").is_file()
    # ... DPO aligned it on the pairs, starting from the SFT model ...
    aligned = "align/checkpoints/step_00000004"
    assert (run / aligned / "COMPLETE").is_file()
    assert json.loads((run / "align" / "base.json").read_text())["checkpoint"].endswith(
        "sft/checkpoints/step_00000008")
    dpo = [json.loads(line) for line in (run / "align" / "metrics.jsonl").read_text().splitlines()]
    assert any("reward_margin" in m for m in dpo)
    # ... the three models were evaluated (bits per byte on the validation shards, the chat tasks) ...
    results = json.loads((run / "eval" / "results.json").read_text())
    assert list(results["models"]) == ["base", "sft", "aligned"]
    assert results["models"]["aligned"]["checkpoint"] == aligned
    for label in ("base", "sft", "aligned"):
        assert 0.5 < results["models"][label]["results"]["bpb"]["bpb"] < 8.0
        assert 0.0 <= results["models"][label]["results"]["chat"]["acc"] <= 1.0
    # The base model is asked in text, the fine-tuned ones in the chat format they were trained on.
    assert [results["models"][label]["results"]["chat"]["format"] for label in ("base", "sft", "aligned")] \
        == ["base", "chat", "chat"]
    assert results["tasks"] == ["bpb", "chat"]
    # ... the final model answered held-out questions, each checked, and was exported.
    chat = json.loads((run / "logs" / "chat.json").read_text())
    assert chat["checkpoint"] == aligned and len(chat["transcripts"]) == 2
    for t in chat["transcripts"]:
        assert t["task"] == "arithmetic" and t["messages"][-1]["role"] == "assistant"
        assert isinstance(t["correct"], bool)
    export = json.loads((run / "export" / "export.json").read_text())
    assert export["checkpoint"] == aligned
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (run / "export" / "hf" / name).is_file() and f"hf/{name}" in export["files"]
    assert (run / "export" / "model.gguf").read_bytes()[:4] == b"GGUF"
    # Where the chat model is, and the commands that talk to it.
    assert f"model:  {run / aligned}" in stdout
    assert f"lmforge chat --checkpoint {run}" in stdout and f"lmforge serve --checkpoint {run}" in stdout
    chat = subprocess.run([sys.executable, "-m", "lmforge", "chat", "--checkpoint", str(run), "--prompt",
                           "What is 2 + 3?", "--max-tokens", "4", "--temperature", "0"],
                          capture_output=True, text=True, timeout=120)
    assert chat.returncode == 0, chat.stderr  # the run directory resolves to its chat model

    md = (run / "report" / "report.md").read_text()
    html = (run / "report" / "report.html").read_text()
    for title, _ in SECTIONS:
        assert f"## {title}" in md and f">{title}</h2>" in html
    assert "Not available" not in md.split("## Stage timings")[0]  # every artefact was found
    for plot in ("loss.png", "lr.png", "throughput.png", "sft_loss.png", "align_loss.png"):
        assert (run / "report" / "plots" / plot).stat().st_size > 5000
    assert (run / "report" / "report.pdf").read_bytes().startswith(b"%PDF")


def test_rerun_skips_every_stage(finished, corpus):
    run, _ = finished
    before = records(run)
    stdout = lmforge_run(run, corpus).stdout
    assert all(line.startswith("skipped") for line in stage_lines(stdout).values())
    assert len(stage_lines(stdout)) == len(STAGE_NAMES)
    assert records(run) == before


def test_changed_config_reruns_its_stage_and_everything_after(finished, corpus, tmp_path):
    run = tmp_path / "copy"
    shutil.copytree(finished[0], run)
    first = records(run)

    # The tokenizer changes: data is kept, the tokenizer and everything after it are redone.
    stdout = lmforge_run(run, corpus, "tokenizer.vocab_size=320").stdout
    after_tokenizer = records(run)
    assert stage_lines(stdout)["data"].startswith("skipped")
    assert after_tokenizer["data"] == first["data"]
    for name in STAGE_NAMES[1:]:
        assert stage_lines(stdout)[name].startswith("done"), name
        assert after_tokenizer[name]["outputs"] != first[name]["outputs"], name
    assert json.loads((run / "tokenizer" / "stats.json").read_text())["vocab_size"] == 320
    # Nothing finished was lost: the old model (and tokenizer, shards, samples) are kept aside.
    [kept] = (run / "previous").glob("pretrain-*")
    old, new = final_weights(kept), final_weights(run)
    assert all((old[k] == theirs).all() for k, theirs in final_weights(finished[0]).items())
    assert any((old[k] != new[k]).any() for k in new)
    assert {p.name.split("-")[0] for p in (run / "previous").iterdir()} == {
        "tokenizer", "shards", "pretrain", "sft", "align", "eval", "sample", "chat", "export"}
    assert "Redone on changed inputs" in (run / "report" / "report.md").read_text()

    # The data config changes: every stage is redone.
    stdout = lmforge_run(run, corpus, "tokenizer.vocab_size=320", "data.val_fraction=0.1").stdout
    assert all(line.startswith("done") for line in stage_lines(stdout).values())
    manifest = json.loads((run / "data" / "manifest.json").read_text())
    assert manifest["config"]["val_fraction"] == 0.1


def test_a_budget_too_small_for_a_redo_is_refused_before_anything_is_touched(finished, corpus,
                                                                            tmp_path):
    run = tmp_path / "copy"
    shutil.copytree(finished[0], run)
    before = {str(p.relative_to(run)): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    # A changed budget is a changed input of the training stages: they and every stage after them
    # would be redone, in under a minute: each training stage needs run.min_stage_s (30 s), the
    # others as long as they took, and the driver keeps 5 s.
    took = sum(r["seconds"] for name, r in records(run).items()
               if name in ("eval", "sample", "chat", "export", "report"))
    need = 3 * 30 + took + 5
    command = run_command(run, corpus)
    command[command.index("--time-budget") + 1] = "1m"
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.strip().count("\n") == 0, done.stderr
    # The smallest budget it names adds what the command had already spent (imports, planning:
    # seconds on a busy machine), rounded up to ten seconds.
    named = int(re.search(r"give --time-budget (\d+)s", done.stderr).group(1))
    assert named % 10 == 0 and math.ceil(need / 10) * 10 <= named <= need + 60, done.stderr
    assert {str(p.relative_to(run)): p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def wait_for_step(run: Path, process: subprocess.Popen, step: int, timeout: float = 240) -> None:
    """Poll metrics.jsonl until a training line of `step` or later appears (else kill and fail)."""
    deadline = time.monotonic() + timeout
    path = run / "metrics.jsonl"
    while time.monotonic() < deadline and process.poll() is None:
        if path.is_file():
            for line in path.read_text().splitlines():
                try:
                    if json.loads(line).get("step", 0) >= step:
                        return
                except json.JSONDecodeError:
                    pass  # a line being written
        time.sleep(0.02)
    ended = process.poll() is not None
    process.kill()
    process.communicate()
    raise AssertionError("the run ended before it could be interrupted" if ended
                         else f"no step {step} within {timeout}s")


def test_interrupted_run_continues_to_the_same_artefacts(finished, corpus, tmp_path):
    reference, _ = finished
    run = tmp_path / "interrupted"

    # SIGINT: pre-training finishes its step, checkpoints, and the command exits 130.
    process = subprocess.Popen(run_command(run, corpus), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    wait_for_step(run, process, 12)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130, out + err
    assert "run the same command again" in err
    assert records(run)["pretrain"]["status"] == "running"

    # SIGKILL: no chance to clean up at all.
    process = subprocess.Popen(run_command(run, corpus), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    wait_for_step(run, process, 25)
    process.kill()
    out, _ = process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL
    assert "resuming pre-training from step_" in out

    done = lmforge_run(run, corpus)
    lines = stage_lines(done.stdout)
    for name in ("data", "tokenizer", "shards"):
        assert lines[name].startswith("skipped"), name
    assert "resuming pre-training from step_000000" in done.stdout
    assert records(run)["pretrain"]["status"] == "complete"

    # The same artefacts as the uninterrupted run.
    for path in ("tokenizer/tokenizer.json", "logs/samples.json", "logs/chat.json"):
        assert (run / path).read_text() == (reference / path).read_text(), path
    ours, theirs = final_weights(run), final_weights(reference)
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert (ours[name] == theirs[name]).all(), name


def test_bad_inputs_are_one_line_errors(tmp_path, corpus):
    cases = [
        (["--time-budget", "soon"], "--time-budget"),
        (["--source", str(tmp_path / "missing.txt")], "missing.txt"),
        (["--set", "model.n_heads=3"], "model.n_heads"),
        (["--source", str(corpus), "--time-budget", "1s"], "--time-budget"),
        (["--source", str(corpus), "--until", "deploy"], "--until deploy: no such stage"),
        (["--set", "run.align=ppo"], "run.align"),
        (["--set", "run.export=onnx"], "run.export"),
    ]
    # The stages whose modules another part of lmforge provides are off, so each case meets its error.
    lifecycle = ["--set", "run.align=none", "--set", "run.export=hf"]
    for args, needle in cases:
        done = subprocess.run([sys.executable, "-m", "lmforge", "run", "--out", str(tmp_path / "r"),
                               *lifecycle, *args], capture_output=True, text=True, timeout=120)
        assert done.returncode == 2, (args, done.stderr)
        error = done.stderr.strip().splitlines()
        assert error[-1].startswith("error: ") and needle in error[-1], (args, done.stderr)
        assert "Traceback" not in done.stderr
