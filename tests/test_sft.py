"""lmforge sft: overfits a few conversations, resumes exactly after SIGKILL (full and LoRA), leaves
a checkpoint that load_model and sample read, and turns bad input into one line, exit 2."""

from __future__ import annotations

import json
import math
import shutil
import statistics
from pathlib import Path

import pytest
import torch
from train_fixtures import flags as _sets
from train_fixtures import kill_and_resume, losses, read_metrics
from train_fixtures import run_lmforge as _lmforge

import lmforge
from lmforge.checkpoint import save_model
from lmforge.config import load_config
from lmforge.finetune.data import SftData
from lmforge.finetune.lora import base_reference
from lmforge.finetune.sft import sft
from lmforge.hashing import file_sha256
from lmforge.model import Transformer
from lmforge.tasks.common import Example, Task, final_number
from lmforge.tasks.score import score_task
from lmforge.tokenizer import load_tokenizer, train_tokenizer

MODEL = ["model.vocab_size=320", "model.d_model=64", "model.n_layers=2", "model.n_heads=4",
         "model.n_kv_heads=2", "model.max_seq_len=64"]
# A short, fast run: evaluated and checkpointed every 4 steps, no time budget.
RUN = ["train.max_steps=12", "train.batch_size=4", "train.eval_every=4", "train.eval_batches=2",
       "train.checkpoint_every=4", "train.tensorboard=false", "sft.val_fraction=0.2"]

CONVERSATIONS = [
    [{"role": "user", "content": f"What is {a} plus {b}?"},
     {"role": "assistant", "content": f"{a} + {b} = {a + b}"}]
    for a, b in [(2, 3), (4, 1), (7, 5), (6, 6), (9, 2), (3, 8), (5, 5), (1, 9), (8, 4), (2, 7),
                 (4, 4), (6, 3), (1, 1), (9, 9), (7, 2), (3, 3)]
] + [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"},
      {"role": "assistant", "content": "Hi there."}, {"role": "user", "content": "Bye"},
      {"role": "assistant", "content": "Goodbye."}]]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A tiny random model with a tokenizer that has the chat tokens (the default specials)."""
    root = tmp_path_factory.mktemp("base")
    text = " ".join(m["content"] for c in CONVERSATIONS for m in c) * 4
    train_tokenizer([text, "the quick brown fox jumps over the lazy dog"], vocab_size=300,
                    workers=1).save(root / "tokenizer")
    cfg = load_config(overrides=MODEL)
    torch.manual_seed(0)
    return save_model(Transformer(cfg.model), cfg, root / "ckpt", tokenizer_dir=root / "tokenizer")


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "chat.jsonl"
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CONVERSATIONS), encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------
# Learning


def test_sft_overfits_a_handful_of_conversations(base, tmp_path):
    """Four conversations seen again and again: the loss on their assistant tokens goes to ~0."""
    few = CONVERSATIONS[:3] + CONVERSATIONS[-1:]
    cfg = load_config(overrides=[*MODEL, "train.max_steps=80", "train.batch_size=4", "train.lr=1e-2",
                                 "train.warmup_steps=5", "train.weight_decay=0", "train.eval_every=80",
                                 "train.checkpoint_every=80", "train.tensorboard=false"])
    result = sft(cfg, base_reference(base), SftData(train=few, val=few), tmp_path, report=lambda _: None)
    assert result.step == 80
    # The run's own validation here is the training set: the assistant-token loss of the final model.
    assert result.val_loss is not None and result.val_loss < 0.05
    rows = [r for r in read_metrics(tmp_path) if "loss" in r and "event" not in r]
    assert rows[0]["loss"] > 2.0  # a random model starts near log(vocab)
    # Asked with the chat prompt, the fine-tuned model answers its questions (score_task's
    # greedy answers, checked by a task's checker); the random base answers none.
    task = _Memorised(few[:3])
    tok = load_tokenizer(base / "tokenizer")
    assert score_task(lmforge.load_model(tmp_path), tok, task, n=3).accuracy == 1.0
    assert score_task(lmforge.load_model(base), tok, task, n=3).accuracy == 0.0


class _Memorised(Task):
    """The arithmetic conversations above as a task's test split, checked by the final number."""

    name = "memorised"

    def __init__(self, conversations) -> None:
        self.examples = [Example(self.name, tuple(c), c[-1]["content"].split()[-1], str(i))
                         for i, c in enumerate(conversations)]

    def generate(self, split: str, seed: int, n: int) -> list[Example]:
        return self.examples[:n]

    def check(self, example: Example, answer_text: str) -> bool:
        return final_number(answer_text) == example.answer


def test_the_loss_counts_assistant_tokens_only(base, tmp_path):
    """The objective's loss equals cross-entropy over exactly the masked-in targets (the chat
    format's mask, computed independently here from render_conversation)."""
    from lmforge.chat import render_conversation
    from lmforge.distributed import init_parallel
    from lmforge.finetune.sft import SFTObjective

    cfg = load_config(overrides=[*MODEL, "train.batch_size=2"])
    tok = load_tokenizer(base / "tokenizer")
    conv = CONVERSATIONS[-1]
    objective = SFTObjective(cfg, SftData(train=[conv, conv]), tok, init_parallel(cfg))
    batch = objective.next_batch()
    model = lmforge.load_model(base)
    ids, mask = render_conversation(tok, conv)
    logits = model(torch.tensor([ids[:-1]]))[0]
    keep = torch.tensor(mask[1:], dtype=torch.bool)
    expected = torch.nn.functional.cross_entropy(logits[keep], torch.tensor(ids[1:])[keep])
    assert torch.allclose(objective.loss(model, batch), expected, atol=1e-5)


# --------------------------------------------------------------------------------------------
# Exact resume after SIGKILL, and what the run leaves


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_sigkill_and_resume_reproduce_an_uninterrupted_run(base, data_file, tmp_path, lora):
    extra = ["lora.rank=4", "lora.alpha=8", "lora.dropout=0.1", "train.lr=1e-2"] if lora else []
    args = ["sft", "--checkpoint", str(base), "--data", str(data_file)]

    def checkpointed(run: Path) -> None:
        assert (run / "checkpoints" / "step_00000004" / "COMPLETE").is_file()

    done, reference, killed_run = kill_and_resume(args, [*RUN, *extra], tmp_path, before_resume=checkpointed)
    assert "parameters train" in done.stdout
    expected = losses(reference)
    assert sorted(expected) == list(range(1, 13))
    assert losses(killed_run) == expected
    # val_loss rows where evaluated, identical too.
    vals = {r["step"]: r["val_loss"] for r in read_metrics(killed_run) if "val_loss" in r}
    assert vals == {r["step"]: r["val_loss"] for r in read_metrics(reference) if "val_loss" in r}
    assert sorted(vals) == [4, 8, 12]
    # The run records its base; a LoRA run's checkpoints hold adapters, not the base's weights.
    record = json.loads((reference / "base.json").read_text())
    assert record["sha256"] == file_sha256(base / "model.safetensors")
    final = reference / "checkpoints" / "step_00000012"
    assert (final / "lora.safetensors").is_file() == lora
    assert (final / "model.safetensors").is_file() == (not lora)


def test_sigterm_checkpoints_and_exits_143_and_a_non_run_out_is_refused(base, data_file, tmp_path):
    run = tmp_path / "run"
    args = ["sft", "--checkpoint", str(base), "--data", str(data_file), "--out", str(run)]
    stopped = _lmforge(*args, *_sets(*RUN, "debug.inject=sigterm@3"), check=False)
    assert stopped.returncode == 143, stopped.stderr
    assert (run / "checkpoints" / "step_00000003" / "COMPLETE").is_file()
    again = _lmforge(*args, *_sets(*RUN), check=False)  # a new run into a run's checkpoints
    assert again.returncode == 2 and "--resume" in again.stderr
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    refused = _lmforge(*args[:-1], str(other), *_sets(*RUN), check=False)
    assert refused.returncode == 2 and "notes.txt" in refused.stderr


def test_final_checkpoint_loads_and_samples(base, data_file, tmp_path):
    run = tmp_path / "run"
    _lmforge("sft", "--checkpoint", str(base), "--data", str(data_file), "--out", str(run),
             *_sets(*RUN, "train.max_steps=4", "lora.rank=2"))
    model = lmforge.load_model(run)  # the base with the adapters merged: a plain Transformer
    assert isinstance(model, Transformer)
    base_model = lmforge.load_model(base)
    assert any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(), base_model.state_dict().values()))
    sampled = _lmforge("sample", "--checkpoint", str(run), "--prompt", "What", "--max-new-tokens", "5")
    assert sampled.stdout.startswith("What")
    from lmforge.checkpoint import read_config
    from lmforge.finetune.sft import SFT_GUARD_DEFAULTS

    assert read_config(run / "checkpoints" / "step_00000004").guard.min_rel_spread == SFT_GUARD_DEFAULTS["min_rel_spread"]


def test_the_sft_guard_lets_a_batch_of_long_answers_pass_and_still_stops_blow_ups():
    """Length buckets make whole batches of hard (long corpus) or easy (short arithmetic) answers:
    a hard batch is no spike under the SFT guard, a blow-up to many times the median still is."""
    import dataclasses
    import random

    from lmforge.config import GuardConfig
    from lmforge.finetune.sft import SFT_GUARD_DEFAULTS
    from lmforge.train.guard import LossGuard

    rng = random.Random(0)
    pretrain, finetune = LossGuard(GuardConfig()), LossGuard(dataclasses.replace(GuardConfig(), **SFT_GUARD_DEFAULTS))
    for _ in range(50):  # like a tiny run's SFT batch losses (median 1.7)
        loss = 1.7 * math.exp(rng.gauss(0.0, 0.25))
        pretrain.observe(loss)
        finetune.observe(loss)
    hard_batch = 4.93  # measured: its gradient norm 1.27, the run's median 1.1
    assert pretrain.check(hard_batch, 1.27) == "spike"  # the pre-training floor misfires
    assert finetune.check(hard_batch, 1.27) is None
    for _ in range(50):  # later the easy batches are learned: their losses fall, the hard ones do not
        finetune.observe(1.2 * math.exp(rng.gauss(0.0, 0.25)))
    assert finetune.check(5.07, 2.12) is None  # measured at step 1362 of a continued run
    assert finetune.check(10 * statistics.median(finetune.losses), 1.27) == "spike"
    assert finetune.check(float("nan"), 1.0) == "nan_loss"


# --------------------------------------------------------------------------------------------
# Bad input: one line on stderr, exit 2


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def plain_base(tmp_path_factory) -> Path:
    """A checkpoint whose tokenizer has no chat tokens."""
    root = tmp_path_factory.mktemp("plain")
    train_tokenizer(["abc abd abe"], vocab_size=262, special_tokens=["<|endoftext|>", "<|pad|>"]).save(root / "tok")
    cfg = load_config(overrides=MODEL)
    return save_model(Transformer(cfg.model), cfg, root / "ckpt", tokenizer_dir=root / "tok")


BAD = {
    "unknown role": (['{"messages": [{"role": "robot", "content": "x"}]}'], None, "unknown role 'robot'"),
    "empty conversation": (['{"messages": []}'], None, "empty conversation"),
    "no assistant turn": (['{"messages": [{"role": "user", "content": "hi"}]}'], None, "no assistant turn"),
    "not JSONL": (["this is not json"], None, "not a JSON line"),
    "no chat tokens": (None, "plain", "lacks the chat tokens"),
    "unknown LoRA target": (None, "gpt2", "lora.targets: 'gate' is not a layer"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_and_exit_2(case, base, plain_base, data_file, tmp_path):
    lines, variant, message = BAD[case]
    data = _write(tmp_path / "bad.jsonl", lines) if lines else data_file
    checkpoint = plain_base if variant == "plain" else base
    extra = ["lora.rank=2", "lora.targets=gate"] if variant == "gpt2" else []
    if variant == "gpt2":  # a base whose MLP has no gate projection
        cfg = load_config(overrides=[*MODEL, "model.arch=gpt2"])
        checkpoint = save_model(Transformer(cfg.model), cfg, tmp_path / "gpt2", tokenizer_dir=base / "tokenizer")
    proc = _lmforge("sft", "--checkpoint", str(checkpoint), "--data", str(data), "--out", str(tmp_path / "run"),
                    *_sets(*RUN, *extra), check=False)
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and message in proc.stderr, proc.stderr



STAGE_ARGS = {
    "sft": ["sft", "--data", "builtin:chat"],
    "dpo": ["dpo", "--data", "builtin:prefs"],
    "reward train": ["reward", "train", "--data", "builtin:prefs"],
    "grpo": ["grpo", "--tasks", "arithmetic"],
}


@pytest.mark.parametrize("stage", list(STAGE_ARGS))
def test_every_training_stage_refuses_a_base_without_chat_tokens(stage, plain_base, tmp_path):
    """SFT, DPO, the reward model and GRPO read the base's tokenizer through one check
    (`chat_tokenizer`): a tokenizer without the chat tokens, or none at all, is one line, exit 2."""
    bare = tmp_path / "bare"
    shutil.copytree(plain_base, bare)
    shutil.rmtree(bare / "tokenizer")
    for checkpoint, message in ((plain_base, "lacks the chat tokens"), (bare, "has no tokenizer/ directory")):
        proc = _lmforge(*STAGE_ARGS[stage], "--checkpoint", str(checkpoint), "--out", str(tmp_path / "run"),
                        *_sets("train.max_steps=1", "train.tensorboard=false"), check=False)
        assert proc.returncode == 2, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and message in proc.stderr, proc.stderr
