"""Reward models: the Bradley-Terry loss against its closed form, a toy preference learnt to > 95%
pairwise accuracy on held-out pairs, exact resume after SIGKILL, `reward score`, best-of-n chat,
and a reward model passed as a policy refused in one line (exit 2)."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
from train_fixtures import kill_and_resume, losses, read_metrics
from train_fixtures import run_lmforge as _lmforge

from lmforge.align.reward import bradley_terry_loss, load_reward_model, train_reward_model
from lmforge.checkpoint import save_model
from lmforge.config import load_config
from lmforge.errors import UserError
from lmforge.finetune.lora import base_reference
from lmforge.model import Transformer
from lmforge.tokenizer import train_tokenizer

MODEL = ["model.vocab_size=320", "model.d_model=64", "model.n_layers=2", "model.n_heads=4",
         "model.n_kv_heads=2", "model.max_seq_len=64"]
WORDS = "the a red blue cat dog sees finds river house moon apple green old small runs".split()
RUN = ["train.batch_size=8", "train.eval_every=20", "train.eval_batches=4", "train.checkpoint_every=20",
       "train.tensorboard=false", "train.lr=3e-3", "train.warmup_steps=5", "reward.val_fraction=0.2"]


def toy_pairs(n: int, seed: int) -> list[dict]:
    """The toy preference: of two answers that differ in one word, the one saying "please"."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 7))]
        where = rng.randrange(len(words) + 1)
        polite = words[:where] + ["please"] + words[where:]
        rude = words[:where] + [rng.choice(["now", "quickly", "today"])] + words[where:]
        out.append({"prompt": f"Ask for the {rng.choice(WORDS)}.", "chosen": " ".join(polite),
                    "rejected": " ".join(rude)})
    return out


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("base")
    text = " ".join(p["prompt"] + " " + p["chosen"] + " " + p["rejected"] for p in toy_pairs(200, 99))
    train_tokenizer([text], vocab_size=300, workers=1).save(root / "tokenizer")
    cfg = load_config(overrides=MODEL)
    torch.manual_seed(0)
    return save_model(Transformer(cfg.model), cfg, root / "ckpt", tokenizer_dir=root / "tokenizer")


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in toy_pairs(400, 0)), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def reward_run(base, pairs_file, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("rm") / "run"
    cfg = load_config(overrides=[*MODEL, *RUN, "train.max_steps=100", f"reward.data=[{json.dumps(str(pairs_file))}]"])
    train_reward_model(cfg, base_reference(base), run, report=lambda _: None)
    return run


def test_bradley_terry_loss_and_gradient_follow_the_closed_form():
    chosen = torch.tensor([0.0, 2.0, -1.0], requires_grad=True)
    rejected = torch.tensor([0.0, 0.5, 1.0], requires_grad=True)
    out = bradley_terry_loss(chosen, rejected)
    assert out[0].item() == pytest.approx(math.log(2))
    assert out[1].item() == pytest.approx(math.log(1 + math.exp(-1.5)))
    out.sum().backward()
    expected = -torch.sigmoid(rejected.detach() - chosen.detach())  # d/d chosen of log(1 + e^-(c - r))
    assert torch.allclose(chosen.grad, expected) and torch.allclose(rejected.grad, -expected)


def test_a_toy_preference_is_learnt_to_over_95_percent_on_held_out_pairs(reward_run):
    evals = [r for r in read_metrics(reward_run) if "val_loss" in r]
    assert evals[-1]["step"] == 100 and evals[-1]["accuracy"] > 0.95
    first = next(r for r in read_metrics(reward_run) if r.get("step") == 1 and "loss" in r)
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)  # the head starts at zero
    # Pairs never seen (another seed), scored through the public API.
    model = load_reward_model(reward_run)
    fresh = toy_pairs(100, seed=12345)
    prompts = [[{"role": "user", "content": p["prompt"]}] for p in fresh]
    chosen = model.score(prompts, [p["chosen"] for p in fresh])
    rejected = model.score(prompts, [p["rejected"] for p in fresh])
    assert sum(c > r for c, r in zip(chosen, rejected)) / len(fresh) > 0.95


@pytest.mark.slow
def test_sigkill_and_resume_reproduce_an_uninterrupted_run(base, pairs_file, tmp_path):
    args = ["reward", "train", "--checkpoint", str(base), "--data", str(pairs_file)]
    run = [*RUN, "train.max_steps=12", "train.eval_every=4", "train.checkpoint_every=4", "train.eval_batches=2"]
    _, reference, killed_run = kill_and_resume(args, run, tmp_path)
    assert sorted(losses(reference)) == list(range(1, 13)) and losses(killed_run) == losses(reference)
    accuracy = {r["step"]: r["accuracy"] for r in read_metrics(reference) if "val_loss" in r}
    assert accuracy == {r["step"]: r["accuracy"] for r in read_metrics(killed_run) if "val_loss" in r}


@pytest.mark.slow
def test_reward_score_prints_scores_and_best_of_n_chat_picks_one(base, reward_run, pairs_file, tmp_path):
    answers = tmp_path / "answers.jsonl"
    answers.write_text(json.dumps({"prompt": "Ask for the cat.", "answer": "the red cat please"}) + "\n"
                       + json.dumps({"prompt": "Ask for the cat.", "answer": "the red cat now"}) + "\n")
    scored = [json.loads(line) for line in _lmforge("reward", "score", "--checkpoint", str(reward_run),
                                                    "--data", str(answers)).stdout.splitlines()]
    assert scored[0]["score"] > scored[1]["score"]
    pairs = _lmforge("reward", "score", "--checkpoint", str(reward_run), "--data", str(pairs_file),
                     "--out", str(tmp_path / "scored.jsonl"))
    assert "pairwise accuracy" in pairs.stderr
    rows = [json.loads(line) for line in (tmp_path / "scored.jsonl").read_text().splitlines()]
    assert len(rows) == 400 and all("chosen_score" in r and "rejected_score" in r for r in rows)
    chat = _lmforge("chat", "--checkpoint", str(base), "--best-of", "3", "--reward", str(reward_run),
                    "--prompt", "Ask for the moon.", "--max-tokens", "6", "--seed", "0")
    assert chat.stdout.strip()


@pytest.mark.parametrize("command", ["dpo", "sft", "chat", "sample", "score-policy", "best-of-without-reward"])
def test_a_reward_model_as_a_policy_is_one_line_and_exit_2(command, base, reward_run, pairs_file, tmp_path):
    rm, out = str(reward_run), str(tmp_path / "out")
    argv, message = {
        "dpo": (["dpo", "--checkpoint", rm, "--data", str(pairs_file), "--out", out], "is a reward model"),
        "sft": (["sft", "--checkpoint", rm, "--data", str(tmp_path / "chat.jsonl"), "--out", out], "is a reward model"),
        "chat": (["chat", "--checkpoint", rm, "--prompt", "hi"], "is a reward model"),
        "sample": (["sample", "--checkpoint", rm, "--prompt", "hi"], "is a reward model"),
        "score-policy": (["reward", "score", "--checkpoint", str(base), "--data", str(pairs_file)],
                         "is not a reward model"),
        "best-of-without-reward": (["chat", "--checkpoint", str(base), "--best-of", "2", "--prompt", "hi"],
                                   "--reward RM go together"),
    }[command]
    (tmp_path / "chat.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "a"},
                                                                  {"role": "assistant", "content": "b"}]}) + "\n")
    proc = _lmforge(*argv, check=False)
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and message in proc.stderr, proc.stderr


def test_load_reward_model_refuses_a_policy(base):
    with pytest.raises(UserError, match="is not a reward model"):
        load_reward_model(base)
