"""lmforge dpo: the losses against their closed forms, the objective against a direct computation
from a model's token log-probabilities, exact resume after SIGKILL with the cached reference,
builtin:prefs pairs (right vs wrong, deterministic), and bad input as one line, exit 2."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from train_fixtures import flags as _sets
from train_fixtures import kill_and_resume, losses, read_metrics
from train_fixtures import run_lmforge as _lmforge

import lmforge
from lmforge.align.config import DpoConfig
from lmforge.align.dpo import DPOObjective, preference_loss, reference_logprobs
from lmforge.align.head_logprobs import token_nll
from lmforge.align.pairs import Pair, render_pairs
from lmforge.align.prefs import make_prefs, verifiable_mixture
from lmforge.checkpoint import save_model
from lmforge.config import load_config
from lmforge.distributed import init_parallel
from lmforge.errors import ConfigError, UserError
from lmforge.model import Transformer
from lmforge.tasks.common import Example, Task
from lmforge.tokenizer import load_tokenizer, train_tokenizer

MODEL = ["model.vocab_size=320", "model.d_model=64", "model.n_layers=2", "model.n_heads=4",
         "model.n_kv_heads=2", "model.max_seq_len=64"]
RUN = ["train.max_steps=12", "train.batch_size=4", "train.eval_every=4", "train.eval_batches=2",
       "train.checkpoint_every=4", "train.tensorboard=false", "train.lr=1e-3", "dpo.val_fraction=0.2"]

PAIRS = [{"prompt": f"What is {a} plus {b}?", "chosen": f"{a} + {b} = {a + b}",
          "rejected": f"{a} + {b} = {a + b + 1}"} for a in range(1, 7) for b in range(2, 6)]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A tiny random model whose tokenizer has the chat tokens."""
    root = tmp_path_factory.mktemp("base")
    text = " ".join(p["prompt"] + " " + p["chosen"] for p in PAIRS) * 4
    train_tokenizer([text, "the quick brown fox jumps over the lazy dog"], vocab_size=300,
                    workers=1).save(root / "tokenizer")
    cfg = load_config(overrides=MODEL)
    torch.manual_seed(0)
    return save_model(Transformer(cfg.model), cfg, root / "ckpt", tokenizer_dir=root / "tokenizer")


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PAIRS), encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------
# The losses against their formulas


@pytest.mark.parametrize("loss", ["sigmoid", "sigmoid_norm"])
@pytest.mark.parametrize("beta", [0.05, 0.1, 1.0])
def test_policy_equal_to_reference_gives_log_2(loss, beta):
    torch.manual_seed(0)
    chosen, rejected = -torch.rand(5, dtype=torch.float64) * 30, -torch.rand(5, dtype=torch.float64) * 30
    tokens = torch.tensor([3, 5, 7, 9, 11])
    out = preference_loss(chosen, rejected, chosen.clone(), rejected.clone(), beta, loss,
                          label_smoothing=0.1, chosen_tokens=tokens, rejected_tokens=tokens + 1)
    assert torch.allclose(out.losses, torch.full((5,), math.log(2), dtype=torch.float64))
    assert torch.equal(out.chosen_rewards, torch.zeros(5, dtype=torch.float64))


def test_sigmoid_gradient_matches_the_closed_form():
    """d/d logp(y_w) of -log sigmoid(beta z) is -beta sigmoid(-beta z), d/d logp(y_l) the opposite,
    with z = (logp_w - ref_w) - (logp_l - ref_l)."""
    beta = 0.5
    policy_w = torch.tensor([-4.0, -10.0, -2.5], dtype=torch.float64, requires_grad=True)
    policy_l = torch.tensor([-6.0, -9.0, -2.0], dtype=torch.float64, requires_grad=True)
    ref_w = torch.tensor([-5.0, -9.5, -3.0], dtype=torch.float64)
    ref_l = torch.tensor([-5.5, -9.0, -1.0], dtype=torch.float64)
    preference_loss(policy_w, policy_l, ref_w, ref_l, beta).losses.sum().backward()
    z = torch.tensor([(-4 + 5) - (-6 + 5.5), (-10 + 9.5) - (-9 + 9), (-2.5 + 3) - (-2 + 1)], dtype=torch.float64)
    expected = -beta * torch.sigmoid(-beta * z)
    assert torch.allclose(policy_w.grad, expected) and torch.allclose(policy_l.grad, -expected)


def test_ipo_and_label_smoothing_follow_their_formulas():
    pw, pl = torch.tensor([-3.0], dtype=torch.float64), torch.tensor([-4.0], dtype=torch.float64)
    rw, rl = torch.tensor([-3.5], dtype=torch.float64), torch.tensor([-3.0], dtype=torch.float64)
    z = (-3.0 + 3.5) - (-4.0 + 3.0)  # 1.5
    ipo = preference_loss(pw, pl, rw, rl, beta=0.25, loss="ipo").losses
    assert ipo.item() == pytest.approx((z - 1 / (2 * 0.25)) ** 2)
    smooth = preference_loss(pw, pl, rw, rl, beta=0.1, label_smoothing=0.2).losses
    expected = -0.8 * math.log(1 / (1 + math.exp(-0.1 * z))) - 0.2 * math.log(1 / (1 + math.exp(0.1 * z)))
    assert smooth.item() == pytest.approx(expected)


def test_the_memory_light_head_matches_cross_entropy_and_its_gradient():
    torch.manual_seed(0)
    h = torch.randn(9, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(13, 6, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([1, 2, -100, 3, 12, 0, -100, 5, 7])
    assert torch.allclose(token_nll(h, w, targets), F.cross_entropy(h @ w.T, targets, reduction="none"))
    assert torch.autograd.gradcheck(lambda a, b: token_nll(a, b, targets), (h, w))


# --------------------------------------------------------------------------------------------
# The objective against a direct computation on a small model


def _answer_logprob(model, tok, prompt, answer) -> torch.Tensor:
    """log p(answer | prompt), summed over the answer's tokens and its <|end|>, from the model's
    logits: the prompt rendered for generation, then the answer's tokens, computed here."""
    from lmforge.chat import render_prompt

    prompt_ids = render_prompt(tok, prompt)
    answer_ids = tok.encode(answer) + [tok.special_tokens["<|end|>"]]
    ids = torch.tensor([prompt_ids + answer_ids])
    logprobs = torch.log_softmax(model(ids[:, :-1])[0].double(), dim=-1)
    positions = torch.arange(len(prompt_ids) - 1, ids.shape[1] - 1)
    return logprobs[positions, ids[0, positions + 1]].sum()


@pytest.mark.parametrize("loss,nll_weight", [("sigmoid", 0.0), ("ipo", 0.0), ("sigmoid_norm", 0.0), ("sigmoid", 0.7)])
def test_dpo_loss_equals_a_direct_computation_from_token_logprobs(base, loss, nll_weight):
    cfg = load_config(overrides=[*MODEL, "train.batch_size=3", f"dpo.loss={loss}", "dpo.beta=0.3",
                                 f"dpo.nll_weight={nll_weight}"])
    tok = load_tokenizer(base / "tokenizer")
    pairs = [Pair([{"role": "user", "content": p["prompt"]}], [{"role": "assistant", "content": p["chosen"]}],
                  [{"role": "assistant", "content": p["rejected"]}]) for p in PAIRS[:3]]
    rendered, _ = render_pairs(tok, pairs, 64)
    reference_model = lmforge.load_model(base)
    identity = lambda: torch.autocast("cpu", enabled=False)  # noqa: E731
    reference = {f"train_{side}": reference_logprobs(reference_model, [getattr(p, side) for p in rendered],
                                                     tok.pad_id, 2, identity) for side in ("chosen", "rejected")}
    objective = DPOObjective(cfg, rendered, [], reference, tok.pad_id, init_parallel(cfg))
    policy = lmforge.load_model(base)
    with torch.no_grad():  # a policy that differs from the reference
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    batch = objective.next_batch()
    ours = objective.loss(policy, batch)

    expected, chosen_logprob, chosen_tokens = [], 0.0, 0
    for i in batch_order(objective):
        p = PAIRS[i]
        prompt = [{"role": "user", "content": p["prompt"]}]
        ratio = {side: (_answer_logprob(policy, tok, prompt, p[side]) - _answer_logprob(reference_model, tok, prompt, p[side]))
                 for side in ("chosen", "rejected")}
        if loss == "sigmoid_norm":
            ratio = {side: r / (len(tok.encode(p[side])) + 1) for side, r in ratio.items()}
        margin = ratio["chosen"] - ratio["rejected"]
        expected.append((margin - 1 / (2 * 0.3)) ** 2 if loss == "ipo" else -F.logsigmoid(0.3 * margin))
        chosen_logprob += _answer_logprob(policy, tok, prompt, p["chosen"]).item()
        chosen_tokens += len(tok.encode(p["chosen"])) + 1  # the answer and its <|end|>
    # RPO's term: the chosen answers' negative log-likelihood per token, over the whole batch.
    nll = -chosen_logprob / chosen_tokens
    assert ours.item() == pytest.approx(torch.stack(expected).mean().item() + nll_weight * nll, rel=1e-4)


def batch_order(objective: DPOObjective) -> list[int]:
    """The pair indices of the objective's first batch."""
    return objective._epoch_batches()[0]


# --------------------------------------------------------------------------------------------
# Resume, and what a run leaves


@pytest.mark.slow
def test_sigkill_and_resume_reproduce_an_uninterrupted_run(base, pairs_file, tmp_path):
    args = ["dpo", "--checkpoint", str(base), "--data", str(pairs_file)]
    # Plain DPO (dpo.nll_weight=0): step 1's loss is then log 2 exactly.
    written: dict[str, int] = {}

    def cache_time(run: Path) -> None:
        written["ns"] = (run / "reference_logps.safetensors").stat().st_mtime_ns

    done, reference, killed_run = kill_and_resume(args, [*RUN, "dpo.nll_weight=0"], tmp_path,
                                                before_resume=cache_time)
    assert "training and" in done.stdout
    # The resumed run read the reference, never recomputed it.
    assert (killed_run / "reference_logps.safetensors").stat().st_mtime_ns == written["ns"]
    assert sorted(losses(reference)) == list(range(1, 13))
    assert losses(killed_run) == losses(reference)

    def rows(run: Path, key: str) -> dict[int, float]:
        return {r["step"]: r[key] for r in read_metrics(run) if key in r and "event" not in r}

    for key in ("reward_margin", "reward_accuracy", "chosen_reward", "rejected_reward", "val_loss"):
        assert rows(killed_run, key) == rows(reference, key), key
    first = next(r for r in read_metrics(reference) if r.get("step") == 1 and "loss" in r)
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-5)  # the policy starts as the reference
    assert sorted(rows(reference, "val_loss")) == [4, 8, 12]
    assert json.loads((reference / "base.json").read_text())["checkpoint"] == str(base.resolve())
    # The stage's guard floor for preference losses (see PREFERENCE_GUARD_DEFAULTS), not pre-training's.
    assert "min_abs_spread = 0.25" in (reference / "config.toml").read_text()
    # A normal checkpoint: load_model reads it and it moved away from the base.
    trained = lmforge.load_model(reference)
    assert any(not torch.equal(a, b) for a, b in zip(trained.state_dict().values(),
                                                     lmforge.load_model(base).state_dict().values()))


@pytest.mark.slow
def test_lora_dpo_leaves_an_adapter_checkpoint(base, pairs_file, tmp_path):
    run = tmp_path / "run"
    _lmforge("dpo", "--checkpoint", str(base), "--data", str(pairs_file), "--out", str(run),
             *_sets(*RUN, "train.max_steps=4", "lora.rank=2", "dpo.loss=ipo", "dpo.nll_weight=0"))
    assert (run / "checkpoints" / "step_00000004" / "lora.safetensors").is_file()
    first = next(r for r in read_metrics(run) if r.get("step") == 1 and "loss" in r)
    assert first["loss"] == pytest.approx((0 - 1 / (2 * 0.1)) ** 2, rel=1e-4)  # IPO at policy == reference
    assert isinstance(lmforge.load_model(run), Transformer)


def test_run_dpo_is_the_pipeline_entry_and_resumes(base, pairs_file, tmp_path):
    """run_dpo(cfg, checkpoint, run_dir, resume) with the pairs from cfg.dpo.data: a run of 4 steps,
    then the same call with resume and max_steps 6 goes on from step 4 (no step done twice)."""
    from lmforge.align.dpo import run_dpo

    def cfg(steps: int):
        return load_config(overrides=[*MODEL, *RUN, f"train.max_steps={steps}",
                                      f"dpo.data=[{json.dumps(str(pairs_file))}]"])

    assert run_dpo(cfg(4), base, tmp_path / "run").step == 4
    assert run_dpo(cfg(6), base, tmp_path / "run", resume=True).step == 6
    steps = [r["step"] for r in read_metrics(tmp_path / "run") if "loss" in r and "event" not in r]
    assert steps == [1, 2, 3, 4, 5, 6]
    wrong_model = load_config(overrides=[*MODEL, "model.n_layers=3"])
    with pytest.raises(UserError, match="model.n_layers"):
        run_dpo(wrong_model, base, tmp_path / "other")


# --------------------------------------------------------------------------------------------
# builtin:prefs


class _EndsWithVowel(Task):
    """A task whose checker accepts answers whose last letter is a vowel: about a fifth of a
    random model's answers are right, so most prompts give a pair, some none."""

    name = "vowel"

    def generate(self, split: str, seed: int, n: int) -> list[Example]:
        return [Example(self.name, ({"role": "user", "content": f"Say something {split} {i}"},
                                    {"role": "assistant", "content": "aeiou"}), "", f"{split}{i}")
                for i in range(n)]

    def check(self, example: Example, answer_text: str) -> bool:
        letters = [c for c in answer_text.lower() if c.isalpha()]
        return bool(letters) and letters[-1] in "aeiou"


def test_builtin_prefs_pair_right_with_wrong_answers_deterministically(base):
    tok = load_tokenizer(base / "tokenizer")
    cfg = DpoConfig(prefs_prompts=12, prefs_val_prompts=4, prefs_samples=6, prefs_max_tokens=8, prefs_pairs=2,
                    prefs_tasks=["vowel"])
    task = _EndsWithVowel()
    made = [make_prefs(lmforge.load_model(base), tok, cfg, seed=3, tasks={"vowel": task}) for _ in range(2)]
    assert made[0] == made[1]  # the same seed, the same pairs
    data = made[0]
    assert data.train and data.val
    for pair in data.train + data.val:
        example = Example("vowel", (*pair.prompt, {"role": "assistant", "content": ""}), "", "")
        assert task.check(example, pair.chosen[0]["content"]) and not task.check(example, pair.rejected[0]["content"])
    assert all("test" not in p.prompt[0]["content"] for p in data.train)  # train pairs from the train split
    assert all("test" in p.prompt[0]["content"] for p in data.val)
    train_note = data.notes[0]
    counts = [int(w) for w in train_note.replace(",", "").split() if w.isdigit()]
    pairs, prompts, all_right, all_wrong, too_long = counts
    assert prompts == 12 and pairs == len(data.train) and all_right + all_wrong + too_long < prompts
    other = make_prefs(lmforge.load_model(base), tok, cfg, seed=4, tasks={"vowel": task})
    assert other.train != data.train


class _Unchecked(_EndsWithVowel):
    name = "unchecked"
    verifiable = False


def test_prefs_tasks_set_the_prompt_shares(base):
    tasks = {"vowel": _EndsWithVowel(), "other": _EndsWithVowel(), "unchecked": _Unchecked()}
    assert verifiable_mixture(tasks, ["vowel:3", "other"]) == {"vowel": 0.75, "other": 0.25}
    assert set(verifiable_mixture(tasks)) == {"vowel", "other"}  # builtin:chat's shares, checked tasks only
    for bad in (["unchecked"], ["nope:2"]):
        with pytest.raises(UserError, match="not a verifiable task"):
            verifiable_mixture(tasks, bad)
    for bad in ("vowel:0", "vowel:x"):
        with pytest.raises(ConfigError, match="TASK:WEIGHT"):
            DpoConfig(prefs_tasks=[bad]).validate()
    tok = load_tokenizer(base / "tokenizer")
    cfg = DpoConfig(prefs_prompts=8, prefs_val_prompts=0, prefs_samples=4, prefs_max_tokens=6,
                    prefs_tasks=["other"])
    asked = []

    class Counting(_EndsWithVowel):
        def generate(self, split: str, seed: int, n: int) -> list[Example]:
            asked.append((self.name, n))
            return super().generate(split, seed, n)

    counting = {"vowel": Counting(), "other": Counting()}
    counting["other"].name = "other"
    with contextlib.suppress(UserError):  # a random model may find no pair; the prompts are what counts
        make_prefs(lmforge.load_model(base), tok, cfg, seed=0, tasks=counting)
    assert asked == [("other", 8)]


# --------------------------------------------------------------------------------------------
# Bad input: one line on stderr, exit 2


BAD = {
    "identical answers": ('{"prompt": "hi", "chosen": "yes", "rejected": "yes"}', "the same answer"),
    "missing field": ('{"prompt": "hi", "chosen": "yes"}', "missing field 'rejected'"),
    "prompt ends with the answer": ('{"prompt": [{"role": "user", "content": "hi"}, {"role": "assistant", '
                                    '"content": "x"}], "chosen": "a", "rejected": "b"}', "ends with an assistant turn"),
    "not JSON": ("{nope", "not a JSON line"),
    "unknown loss": (None, "dpo.loss='kto' must be one of"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_and_exit_2(case, base, pairs_file, tmp_path):
    line, message = BAD[case]
    data = pairs_file
    if line is not None:
        data = tmp_path / "bad.jsonl"
        data.write_text(json.dumps(PAIRS[0]) + "\n" + line + "\n", encoding="utf-8")
    extra = ["dpo.loss=kto"] if case == "unknown loss" else []
    proc = _lmforge("dpo", "--checkpoint", str(base), "--data", str(data), "--out", str(tmp_path / "run"),
                    *_sets(*RUN, *extra), check=False)
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and message in proc.stderr, proc.stderr
    if line is not None:
        assert f"{data}:2:" in proc.stderr


def test_a_resume_that_changes_the_prefs_settings_is_refused(base, pairs_file, tmp_path):
    """builtin:prefs pairs are sampled once, with the dpo.prefs_* settings, and cached in the run:
    a resume with other settings would silently go on with the old pairs, so it is refused."""
    args = ["dpo", "--checkpoint", str(base), "--data", str(pairs_file), "--out", str(tmp_path / "run")]
    _lmforge(*args, *_sets(*RUN, "train.max_steps=2"))
    proc = _lmforge(*args, "--resume", *_sets("dpo.prefs_prompts=8"), check=False)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "dpo.prefs_prompts: a resumed run keeps the dpo.prefs_* settings" in proc.stderr
    # Other settings may change on a resume: a longer run.
    assert "step 3/3" in _lmforge(*args, "--resume", *_sets("train.max_steps=3")).stdout


# held-out pass@1 (the score the run keeps its best checkpoint by)


def test_held_out_pass_at_1_counts_the_answers_the_tasks_accept(base):
    """pass_at_1 asks the engine for greedy answers and counts those each question's task
    accepts (truth: counted here by hand from the same answers)."""
    from types import SimpleNamespace

    from lmforge.align.heldout import pass_at_1

    task = _EndsWithVowel()
    questions = task.generate("test", 0, 5)
    answers = ["idea", "word", "banana", "sky", "tofu"]  # right, wrong, right, wrong, right
    asked = []

    class Engine:
        def generate(self, prompts, params):
            asked.append((prompts, params.temperature))
            return [[SimpleNamespace(text=answers[p[0]])] for p in prompts]

    par = init_parallel(load_config(overrides=[]))
    value = pass_at_1(Engine(), questions, {"vowel": task}, lambda e: [int(e.key[len("test"):])], 8, par)
    assert value == pytest.approx(sum(task.check(q, a) for q, a in zip(questions, answers, strict=True)) / 5) == 0.6
    assert asked == [([[0], [1], [2], [3], [4]], 0.0)]  # every question once, greedy


def test_dpo_scores_and_selects_by_held_out_tasks_only_with_builtin_prefs():
    from lmforge.align.dpo import held_out_tasks

    cfg = load_config(overrides=["dpo.prefs_tasks=[\"letters:3\", \"arithmetic:1\"]", "dpo.eval_examples=40"])
    held = held_out_tasks(cfg, tokenizer=None)
    assert held is not None
    assert [e.task for e in held.questions].count("letters") == 30
    assert [e.task for e in held.questions].count("arithmetic") == 10
    from lmforge.tasks.common import split_of
    assert all(split_of(held.tasks[e.task].split_family or e.task, e.key) == "test" for e in held.questions)
    assert held_out_tasks(load_config(overrides=["dpo.data=[\"pairs.jsonl\"]"]), None) is None
    assert held_out_tasks(load_config(overrides=["dpo.eval_examples=0"]), None) is None


def test_strict_prefs_choose_only_answers_right_by_their_working(base):
    """dpo.prefs_strict: every chosen answer passes check_work (here: ends in 'a' or 'e', a stricter
    rule than the vowel check), every rejected one fails check; a right answer with wrong working
    is neither."""

    class Strict(_EndsWithVowel):
        def check_work(self, example: Example, answer_text: str) -> bool:
            letters = [c for c in answer_text.lower() if c.isalpha()]
            return self.check(example, answer_text) and letters[-1] in "ae"

    tok = load_tokenizer(base / "tokenizer")
    task = Strict()
    cfg = DpoConfig(prefs_prompts=24, prefs_val_prompts=0, prefs_samples=8, prefs_max_tokens=8,
                    prefs_tasks=["vowel"], prefs_strict=True)
    data = make_prefs(lmforge.load_model(base), tok, cfg, seed=3, tasks={"vowel": task})
    loose = make_prefs(lmforge.load_model(base), tok, dataclasses.replace(cfg, prefs_strict=False), seed=3,
                       tasks={"vowel": task})
    assert data.train and len(data.train) < len(loose.train)
    for pair in data.train:
        example = Example("vowel", (*pair.prompt, {"role": "assistant", "content": ""}), "", "")
        assert task.check_work(example, pair.chosen[0]["content"])
        assert not task.check(example, pair.rejected[0]["content"])


@pytest.mark.parametrize("epochs,batch_size,expected", [(3.0, 2, 6), (1.5, 2, 3), (2.0, 1, 8), (0.0, 2, None)])
def test_a_time_budget_may_size_dpo_to_at_most_max_epochs_over_its_pairs(base, epochs, batch_size, expected):
    """dpo.max_epochs x the optimizer steps of one epoch (4 pairs: 2 batches of 2, or 4 of 1)."""
    cfg = load_config(overrides=[*MODEL, f"train.batch_size={batch_size}", f"dpo.max_epochs={epochs}"])
    tok = load_tokenizer(base / "tokenizer")
    pairs = [Pair([{"role": "user", "content": f"q{i}"}], [{"role": "assistant", "content": "yes"}],
                  [{"role": "assistant", "content": "no"}]) for i in range(4)]
    rendered, _ = render_pairs(tok, pairs, 64)
    reference = {f"train_{side}": torch.zeros(4, dtype=torch.float64) for side in ("chosen", "rejected")}
    objective = DPOObjective(cfg, rendered, [], reference, tok.pad_id, init_parallel(cfg))
    assert objective.max_budget_steps == expected
