"""lmforge grpo: advantages, token-level normalisation and the clipped objective against hand-computed
values; zero-signal groups; a toy RL task whose reward rises; exact resume after SIGKILL; the
reward-model hook; bad input as one line, exit 2."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from train_fixtures import read_metrics

import lmforge
from lmforge.align.grpo import (
    GRPOObjective,
    Rollouts,
    format_ok,
    group_advantages,
    grpo,
    grpo_token_loss,
    kl_k3,
    resolve_tasks,
    token_logprobs,
)
from lmforge.config import load_config
from lmforge.distributed import init_parallel
from lmforge.errors import UserError
from lmforge.finetune.lora import base_reference
from lmforge.tasks.common import Example, Task, conversation
from lmforge.tokenizer import load_tokenizer

TESTS = Path(__file__).resolve().parent
ENV = {**os.environ, "PYTHONPATH": f"{TESTS.parent}{os.pathsep}{TESTS}", "OMP_NUM_THREADS": "1"}
WORD = "the"
# A fast run: 4 prompts x 8 answers of at most 8 tokens per step, one micro-batch.
RUN = ["train.max_steps=30", "train.batch_size=32", "train.lr=3e-3", "train.warmup_steps=0",
       "train.weight_decay=0", "train.eval_every=10", "train.checkpoint_every=100",
       "train.tensorboard=false", "train.device=cpu", "grpo.group_size=8", "grpo.prompts_per_step=4",
       "grpo.max_new_tokens=8", "grpo.eval_examples=4", "guard.min_abs_spread=1.0"]


class Say(Task):
    """The toy RL task: any prompt; reward 1 when the answer contains WORD."""

    name = "say"

    def pool(self) -> list[Example]:
        return [Example(self.name, conversation(f"Say something, please ({i}).", WORD), WORD, str(i))
                for i in range(40)]

    def check(self, example: Example, answer_text: str) -> bool:
        return WORD in answer_text


class Always(Say):
    """Every answer is right: every group's rewards are equal."""

    def check(self, example: Example, answer_text: str) -> bool:
        return True


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    from chat_fixtures import tiny_chat_checkpoint

    return tiny_chat_checkpoint(tmp_path_factory.mktemp("base"))[0]


def _config(base: Path, *overrides: str):
    from lmforge.checkpoint import read_config

    return load_config(base={"model": read_config(base).to_dict()["model"]}, overrides=[*RUN, *overrides])


# --------------------------------------------------------------------------------------------
# The pure parts against hand-computed values


def test_group_advantages_with_and_without_std_scaling():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    plain, zero = group_advantages(rewards, scale=False)
    assert zero.tolist() == [False, True, False]
    assert plain.tolist() == [[0.5, -0.5, -0.5, 0.5], [0.0] * 4, [0.75, -0.25, -0.25, -0.25]]
    scaled, _ = group_advantages(rewards, scale=True)
    # Sample standard deviations: group 0 sqrt(4 x 0.25 / 3), group 2 sqrt((0.5625 + 3 x 0.0625) / 3) = 0.5.
    s0, s2 = math.sqrt(1 / 3) + 1e-4, 0.5 + 1e-4
    expected = [[0.5 / s0, -0.5 / s0, -0.5 / s0, 0.5 / s0], [0.0] * 4,
                [0.75 / s2, -0.25 / s2, -0.25 / s2, -0.25 / s2]]
    assert torch.allclose(scaled, torch.tensor(expected, dtype=torch.float64))


def test_token_level_normalisation_weighs_every_token_alike():
    """Two answers of 3 and 1 tokens with advantages +1 and -1, ratio 1: the loss is the sum over
    the 4 tokens / 4 = -(3 - 1) / 4 = -0.5 (a per-sequence mean would give 0), and each token's
    log-prob gets the gradient -A / 4."""
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -9.0, -9.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    advantages = torch.tensor([1.0, -1.0])
    per_token = grpo_token_loss(logp, logp.detach(), logp.detach(), advantages, mask, 0.2, 0.0)
    loss = per_token.sum() / mask.sum()
    assert loss.item() == pytest.approx(-0.5)
    loss.backward()
    assert logp.grad.tolist() == [[-0.25, -0.25, -0.25], [0.25, 0.0, 0.0]]


def test_clipped_ratio_objective_matches_ppo_clip_by_hand():
    """Ratios 1.5, 0.5, 1.1 against advantages +1, -1, +1 with eps 0.2: PPO-clip takes
    min(1.5, 1.2) = 1.2, min(-0.5, -0.8) = -0.8 and min(1.1, 1.1) = 1.1; the clipped tokens get no
    gradient, the third gets -A x ratio = -1.1."""
    old = torch.tensor([[-1.0], [-1.0], [-1.0]])
    logp = (old + torch.log(torch.tensor([[1.5], [0.5], [1.1]]))).requires_grad_(True)
    advantages = torch.tensor([1.0, -1.0, 1.0])
    per_token = grpo_token_loss(logp, old, old, advantages, torch.ones(3, 1), clip_eps=0.2, kl_coef=0.0)
    assert per_token[:, 0].tolist() == pytest.approx([-1.2, 0.8, -1.1])
    per_token.sum().backward()
    assert logp.grad[:, 0].tolist() == pytest.approx([0.0, 0.0, -1.1])
    # The KL penalty adds kl_coef x (exp(d) - d - 1), d = ref - logp: here d = 0.5 on every token.
    ref = logp.detach() + 0.5
    with_kl = grpo_token_loss(logp.detach(), old, ref, advantages, torch.ones(3, 1), 0.2, kl_coef=0.1)
    k3 = math.exp(0.5) - 0.5 - 1
    assert (with_kl - per_token.detach())[:, 0].tolist() == pytest.approx([0.1 * k3] * 3, rel=1e-5)
    assert kl_k3(torch.tensor([-2.0]), torch.tensor([-2.0])).item() == 0.0


def test_format_reward_wants_a_final_answer_line_and_end():
    assert format_ok("2 + 2 = 4.\n#### 4", "stop")
    assert format_ok("#### 1,234 ", "stop")
    assert not format_ok("#### 4", "length")  # never reached <|end|>
    assert not format_ok("the answer is 4", "stop")
    assert not format_ok("#### 4 and more", "stop")


def test_forced_calculator_tokens_are_masked_and_the_end_token_is_trained():
    """The Engine's events: a calculator result it forced says so; "stop" means the policy wrote
    <|end|>, which the Engine leaves out of token_ids."""
    from lmforge.align.grpo import _answers
    from lmforge.engine import Event

    events = [Event(0, "", [10], []), Event(1, "x", [4], []), Event(0, "2+2", [11], []),
              Event(0, "", [12], []), Event(0, "4", [13], [], forced=True),
              Event(1, "y", [5], [], "length"), Event(0, "", [], [], "stop")]
    first, second = _answers(events, 2, end_id=99)
    assert (first.ids, first.sampled, first.text, first.finish_reason) == ([10, 11, 12, 13, 99], [1, 1, 1, 0, 1], "2+24", "stop")
    assert (second.ids, second.sampled, second.finish_reason) == ([4, 5], [1, 1], "length")


def test_the_loss_through_micro_batches_is_the_token_level_loss(base):
    """The objective's micro-batch losses, scaled as the loop scales them, give the gradient of
    sum over all answer tokens / their number, computed here directly from the model's logits."""
    cfg = _config(base, "grpo.prompts_per_step=1", "grpo.group_size=2", "train.batch_size=1")
    tok = load_tokenizer(base / "tokenizer")
    objective = GRPOObjective(cfg, {"say": Say()}, tok, init_parallel(cfg))
    assert objective.accum == 2
    model = lmforge.load_model(base).train()
    objective.attach(model, None)
    rows, starts = [[1, 5, 9, 7, 3, 4, 8], [1, 5, 9, 2]], [4, 3]  # answers of 3 and 1 tokens
    old, ref, _ = objective._score_rows(rows, starts)
    objective.rollouts = Rollouts(ids=rows, start=starts, mask=[[1, 1, 1], [1]], advantage=[0.7, -1.3],
                                  old_logp=[o.tolist() for o in old], ref_logp=[r.tolist() for r in ref],
                                  tokens=4)
    for _ in range(2):
        (objective.loss(model, objective.next_batch()) / objective.accum).backward()
    ours = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    direct = 0.0
    for row, start, adv in zip(rows, starts, [0.7, -1.3], strict=True):
        logits = model(torch.tensor([row[:-1]]))[0, :, :tok.vocab_size]
        logp = torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(row[1:])[:, None])[:, 0]
        direct = direct - adv * logp[start - 1:].sum()  # ratio 1: the plain policy gradient
    (direct / 4).backward()
    for a, p in zip(ours, model.parameters(), strict=True):
        assert torch.allclose(a, p.grad, atol=1e-5)


def test_policy_logprobs_line_up_with_the_engines(base):
    """The objective's own forward pass gives the sampled tokens the log-probs the Engine reported
    for them (at temperature 1): the answer spans are aligned with the model's predictions."""
    from lmforge.engine import Engine, SamplingParams

    cfg = _config(base, "grpo.temperature=1.0")
    tok = load_tokenizer(base / "tokenizer")
    model = lmforge.load_model(base)
    objective = GRPOObjective(cfg, {"say": Say()}, tok, init_parallel(cfg))
    objective.attach(model, None)
    prompt = [1, 5, 9, 7]
    [completions] = Engine(model, tok).generate([prompt], SamplingParams(max_tokens=6, seed=3, n=2, logprobs=True))
    rows = [prompt + c.token_ids for c in completions]
    old, _, entropy = objective._score_rows(rows, [len(prompt)] * 2)
    for c, o, e in zip(completions, old, entropy, strict=True):
        assert o.tolist() == pytest.approx([lp.logprob for lp in c.logprobs], abs=1e-4)
        assert (e > 0).all()
    logp, _ = token_logprobs(model, torch.tensor([rows[0]]), 1.0, tok.vocab_size)
    assert torch.allclose(logp[0, len(prompt) - 1:], old[0])


# --------------------------------------------------------------------------------------------
# Runs: zero-signal groups, a rising reward, the reward-model hook


def test_zero_signal_groups_are_counted_and_give_no_gradient(base, tmp_path):
    cfg = _config(base, "train.max_steps=3", "train.eval_every=3")
    grpo(cfg, base_reference(base), {"say": Always()}, tmp_path, report=lambda _: None)
    rows = [r for r in read_metrics(tmp_path) if "loss" in r and "event" not in r]
    assert [r["zero_signal_groups"] for r in rows] == [1.0, 1.0, 1.0]
    assert all(r["grad_norm"] == 0.0 and r["loss"] == 0.0 and r["reward_mean"] == 1.0 for r in rows)
    # No gradient, no weight decay: the weights are the base's, bit for bit.
    trained, start = lmforge.load_model(tmp_path), lmforge.load_model(base)
    assert all(torch.equal(a, b) for a, b in zip(trained.state_dict().values(), start.state_dict().values()))


@pytest.mark.slow
def test_a_toy_task_drives_the_reward_up(base, tmp_path):
    """Reward 1 for an answer that contains "the": a random model says it ~3% of the time; 30
    steps of GRPO (seconds on a CPU) make it say it almost always."""
    grpo(_config(base), base_reference(base), {"say": Say()}, tmp_path, report=lambda _: None)
    rows = [r for r in read_metrics(tmp_path) if "loss" in r and "event" not in r]
    rewards = [r["reward_mean"] for r in rows]
    assert len(rewards) == 30
    assert sum(rewards[:3]) / 3 < 0.2
    assert sum(rewards[-5:]) / 5 > 0.7
    passes = {r["step"]: r["pass_at_1"] for r in read_metrics(tmp_path) if "pass_at_1" in r}
    assert sorted(passes) == [0, 10, 20, 30] and passes[30] > passes[0]
    for key in ("kl", "entropy", "answer_tokens", "zero_signal_groups"):
        assert all(math.isfinite(r[key]) for r in rows)


@pytest.mark.slow
def test_compiled_rollouts_are_the_eager_ones(base):
    """grpo.compile: the Engine's compiled step (sampled rows drawn inside the graph) runs inside
    the force_eager region alignment samples in, over blocks compiled for training, and samples
    the eager Engine's answers from the same seeds."""
    from lmforge.train.loop import prepare_for_training

    tok = load_tokenizer(base / "tokenizer")
    examples = Say().pool()[:3]
    answers = {}
    for compiled in (False, True):
        cfg = _config(base, "train.compile=true", "grpo.group_size=4", "grpo.max_new_tokens=12",
                      f"grpo.compile={str(compiled).lower()}")
        model = prepare_for_training(lmforge.load_model(base), cfg.train, torch.device("cpu")).train()
        objective = GRPOObjective(cfg, {"say": Say()}, tok, init_parallel(cfg))
        objective.attach(model, None)
        answers[compiled] = [[a.ids for a in group] for group in objective._sample(examples, [11, 12, 13])]
        assert model.training  # back in training mode
    assert objective._engine.compile_seconds > 0  # the compiled run compiled its steps
    assert len({tuple(ids) for ids in answers[False][0]}) > 1  # the group's answers were drawn
    assert answers[True] == answers[False]


def test_the_rollout_cache_holds_keys_in_the_runs_compute_dtype(base):
    """Under bf16 autocast (a GPU's default, asked for on CPU here) the rollout Engine's KV cache
    is bf16, the dtype the run's products come out in - not the fp32 of the master weights, which
    doubled a GPU run's cache memory - and the rollouts still run."""
    cfg = _config(base, "train.dtype=bf16", "grpo.group_size=2", "grpo.max_new_tokens=4")
    model = lmforge.load_model(base).train()
    objective = GRPOObjective(cfg, {"say": Say()}, load_tokenizer(base / "tokenizer"), init_parallel(cfg))
    objective.attach(model, None)
    groups = objective._sample(Say().pool()[:2], [1, 2])
    with objective.autocast():
        products = (torch.ones(2, 2) @ torch.ones(2, 2)).dtype
    assert products == torch.bfloat16
    assert objective._engine.cache.k.dtype == objective._engine.cache.v.dtype == products
    assert [len(g) for g in groups] == [2, 2] and all(a.ids for g in groups for a in g)


def test_the_reward_model_scores_the_answers(base, tmp_path, monkeypatch):
    """grpo.reward_model: load_reward_model(PATH).score(prompts, answers) replaces the checker."""
    calls = []

    class Scorer:
        def score(self, prompts: list[list[dict]], answers: list[str]) -> list[float]:
            calls.append((prompts, answers))
            return [float(len(a)) for a in answers]

    fake = types.ModuleType("lmforge.align.reward")
    fake.load_reward_model = lambda path: Scorer() if path == str(tmp_path) else None
    monkeypatch.setitem(sys.modules, "lmforge.align.reward", fake)
    cfg = _config(base, f"grpo.reward_model={tmp_path}", "grpo.format_reward=0.5")
    tok = load_tokenizer(base / "tokenizer")
    objective = GRPOObjective(cfg, {"say": Say()}, tok, init_parallel(cfg))
    objective.attach(lmforge.load_model(base).train(), None)
    objective._rollout_batch(0)
    [(prompts, answers)] = calls
    assert len(prompts) == len(answers) == 4 * 8
    assert prompts[0] == [{"role": "user", "content": prompts[0][0]["content"]}]
    # The answers are free text here: no `#### N`, so the format reward adds nothing.
    expected = sum(len(a) for a in answers) / len(answers)
    assert objective.last_metrics["reward_mean"] == pytest.approx(expected)


# --------------------------------------------------------------------------------------------
# Exact resume after SIGKILL (a driver process: the toy task is no built-in one)


def drive(base: str, out: str, resume: bool, *overrides: str) -> None:
    """What the subprocesses run: GRPO on the toy task, new or resumed."""
    from lmforge.train.checkpoint import resolve_resume

    cfg = _config(Path(base), *overrides)
    grpo(cfg, base_reference(base), {"say": Say()}, out,
         resume_from=resolve_resume(Path(out), True) if resume else None, report=lambda _: None)


def _drive(base: Path, out: Path, resume: bool, *overrides: str) -> subprocess.CompletedProcess:
    code = f"import test_grpo; test_grpo.drive(*{[str(base), str(out)]!r}, {resume}, *{list(overrides)!r})"
    return subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=300)


def _step_rows(run: Path) -> dict[int, tuple]:
    keys = ("loss", "grad_norm", "reward_mean", "kl", "entropy", "zero_signal_groups")
    return {r["step"]: tuple(r[k] for k in keys) for r in read_metrics(run) if "loss" in r and "event" not in r}


@pytest.mark.slow
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_sigkill_and_resume_reproduce_an_uninterrupted_run(base, tmp_path, lora):
    """Two optimizer steps per rollout batch, a checkpoint at step 5 (between the two steps of a
    batch: the rollouts travel in the checkpoint), killed at step 7."""
    run = ["train.max_steps=10", "train.checkpoint_every=5", "train.eval_every=5", "grpo.epochs_per_batch=2",
           "grpo.max_new_tokens=6", "grpo.kl_coef=0.05"]
    if lora:
        run += ["lora.rank=4", "lora.alpha=8", "lora.dropout=0.1"]
    reference = _drive(base, tmp_path / "reference", False, *run)
    assert reference.returncode == 0, reference.stderr
    killed = _drive(base, tmp_path / "killed", False, *run, "debug.inject=sigkill@7")
    assert killed.returncode == -9, killed.stderr
    assert (tmp_path / "killed" / "checkpoints" / "step_00000005" / "COMPLETE").is_file()
    resumed = _drive(base, tmp_path / "killed", True, *run)
    assert resumed.returncode == 0, resumed.stderr
    expected = _step_rows(tmp_path / "reference")
    assert sorted(expected) == list(range(1, 11))
    assert any(v[1] > 0 for v in expected.values())  # some steps had signal (not all zero)
    # The reference is the starting model (LoRA: adapters off): no KL before the first update, some after.
    assert expected[1][3] == pytest.approx(0.0, abs=1e-6) and expected[10][3] > 1e-4
    assert _step_rows(tmp_path / "killed") == expected
    passes = {r["step"]: r["pass_at_1"] for r in read_metrics(tmp_path / "killed") if "pass_at_1" in r}
    assert passes == {r["step"]: r["pass_at_1"] for r in read_metrics(tmp_path / "reference") if "pass_at_1" in r}


# --------------------------------------------------------------------------------------------
# The command: a run that chat/sample read, and bad input


def _lmforge(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lmforge", *args], capture_output=True, text=True,
                          env=ENV, timeout=300)


def _sets(*overrides: str) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def test_the_command_leaves_a_checkpoint_that_sample_reads(base, tmp_path):
    run = tmp_path / "run"
    done = _lmforge("grpo", "--checkpoint", str(base), "--tasks", "arithmetic", "--out", str(run),
                    *_sets("train.max_steps=2", "grpo.prompts_per_step=2", "grpo.group_size=2",
                           "grpo.max_new_tokens=4", "grpo.eval_examples=2", "train.tensorboard=false"))
    assert done.returncode == 0, done.stderr
    assert json.loads((run / "base.json").read_text())["checkpoint"] == str(base.resolve())
    assert "tasks = [\"arithmetic\"]" in (run / "config.toml").read_text()
    assert [r["step"] for r in read_metrics(run) if "reward_mean" in r] == [1, 2]
    sampled = _lmforge("sample", "--checkpoint", str(run), "--prompt", "def", "--max-new-tokens", "3")
    assert sampled.returncode == 0 and sampled.stdout.startswith("def"), sampled.stderr


def test_run_grpo_is_the_lifecycle_entry_point(base, tmp_path):
    """run_grpo(cfg, checkpoint, run_dir): tasks from cfg.grpo.tasks; resume=True continues."""
    from lmforge.align.grpo import run_grpo

    small = ["train.max_steps=1", "grpo.tasks=arithmetic", "grpo.prompts_per_step=2", "grpo.group_size=2",
             "grpo.max_new_tokens=3", "grpo.eval_examples=2"]
    assert run_grpo(_config(base, *small), base, tmp_path).step == 1
    assert run_grpo(_config(base, *small, "train.max_steps=2"), base, tmp_path, resume=True).step == 2
    assert [r["step"] for r in read_metrics(tmp_path) if "reward_mean" in r] == [1, 2]
    with pytest.raises(UserError, match="model.n_layers: grpo keeps the model"):
        run_grpo(_config(base, *small, "model.n_layers=3"), base, tmp_path / "other")


def test_tasks_resolve_to_the_verifiable_ones():
    chat = resolve_tasks(["chat"])
    assert "chitchat" not in chat and {"arithmetic", "letters"} <= set(chat)
    assert all(t.verifiable for t in chat.values())
    assert "chitchat" in resolve_tasks(["chitchat"], reward_model="rm")  # a reward model can score it
    with pytest.raises(UserError, match="no verifier"):
        resolve_tasks(["arithmetic", "chitchat"])


def test_task_weights_set_the_share_of_the_prompts(base):
    cfg = _config(base, "grpo.tasks=arithmetic:1,letters:3", "grpo.prompts_per_step=8")
    tasks = resolve_tasks(cfg.grpo.tasks)
    assert list(tasks) == ["arithmetic", "letters"]
    objective = GRPOObjective(cfg, tasks, load_tokenizer(base / "tokenizer"), init_parallel(cfg))
    drawn = [e.task for index in range(200) for e in objective._prompts(index)[0]]
    # 1,600 draws of a 1:3 mixture: letters' share is 0.75 +- 0.011 (one binomial sd).
    assert abs(drawn.count("letters") / len(drawn) - 0.75) < 0.05
    for bad in ("letters:0", "letters:x", "letters:-1"):
        with pytest.raises(UserError, match="TASK:WEIGHT"):
            resolve_tasks([bad])


BAD = {
    "no verifier": (["--tasks", "chitchat"], [], "chitchat has no verifier"),
    "unknown task": (["--tasks", "arithmetic,poetry"], [], "unknown task 'poetry'"),
    "group of one": ([], ["grpo.group_size=1"], "grpo.group_size=1 must be >= 2"),
    "zero temperature": ([], ["grpo.temperature=0"], "grpo.temperature=0.0 must be > 0"),
    "model change": ([], ["model.n_layers=3"], "model.n_layers: grpo keeps the model"),
    "missing reward model": ([], ["grpo.reward_model=/no/such/rm"], "no such checkpoint"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_and_exit_2(case, base, tmp_path):
    flags, overrides, message = BAD[case]
    flags = flags or ["--tasks", "arithmetic"]  # not the default chat: its corpus tasks read archives
    proc = _lmforge("grpo", "--checkpoint", str(base), "--out", str(tmp_path / "run"), *flags,
                    *_sets("train.max_steps=1", "train.tensorboard=false", *overrides))
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and message in proc.stderr, proc.stderr


# --------------------------------------------------------------------------------------------
# torchrun: ddp ranks share the prompts and reproduce the one-process run


@pytest.mark.slow
@pytest.mark.distributed
def test_ddp_on_two_ranks_matches_one_process(base, tmp_path):
    """Each rank samples its half of the prompts (same seeds); gradients are averaged with the
    loss scaled by ranks / tokens: the same rewards, losses and gradient norms as one process."""
    run = ["train.max_steps=4", "train.eval_every=4", "train.batch_size=8", "grpo.kl_coef=0.05"]
    single = _drive(base, tmp_path / "one", False, *run)
    assert single.returncode == 0, single.stderr
    two = subprocess.run(["timeout", "240", sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc_per_node=2", str(TESTS / "test_grpo.py"), "--drive", str(base),
                          str(tmp_path / "two"), *run, "train.parallel=ddp"],
                         env=ENV, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    expected, got = _step_rows(tmp_path / "one"), _step_rows(tmp_path / "two")
    assert sorted(got) == sorted(expected) == [1, 2, 3, 4]
    assert any(v[1] > 0 for v in expected.values())
    for step, values in expected.items():
        assert got[step] == pytest.approx(values, rel=1e-4, abs=1e-6), step


if __name__ == "__main__" and sys.argv[1:2] == ["--drive"]:  # the torchrun workers of the test above
    drive(sys.argv[2], sys.argv[3], False, *sys.argv[4:])
