"""train.eval_tasks: benchmarks at every evaluation of the shared loop, logged beside val_loss."""

from __future__ import annotations

import math

import pytest
from train_fixtures import make_shards, read_metrics, tiny_config

from lmforge.errors import UserError
from lmforge.eval.training import flatten
from lmforge.train.pretrain import pretrain

LIMIT = 8


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("data"))


def test_eval_tasks_are_logged_with_the_loss_and_match_a_standalone_evaluation(shards, tmp_path):
    from lmforge.checkpoint import load_model
    from lmforge.eval.runner import EvalOptions, evaluate
    from lmforge.tokenizer import load_tokenizer

    cfg = tiny_config("train.max_steps=10", "train.eval_every=5", 'train.eval_tasks=["arc_easy"]',
                      f"train.eval_limit={LIMIT}")
    result = pretrain(cfg, shards, tmp_path)
    rows = {r["step"]: r for r in read_metrics(tmp_path) if "eval/arc_easy/acc" in r}
    assert sorted(rows) == [5, 10]
    for row in rows.values():
        assert "val_loss" in row and "eval/arc_easy/acc_norm" in row
        assert (row["eval/arc_easy/acc"] * LIMIT).is_integer()  # a share of 8 items
    # The logged score is the score of the weights saved at that step, evaluated on their own.
    standalone = evaluate(load_model(result.checkpoint), load_tokenizer(shards / "tokenizer"),
                          ["arc_easy"], EvalOptions(limit=LIMIT, progress=False))
    assert rows[10]["eval/arc_easy/acc"] == standalone["results"]["arc_easy"]["acc"]
    assert rows[10]["eval/arc_easy/acc_norm"] == standalone["results"]["arc_easy"]["acc_norm"]


@pytest.mark.parametrize("tasks, message", [('["nope"]', "unknown task"), ('["bpb"]', "val_bpb")])
def test_bad_eval_tasks_fail_before_training(shards, tmp_path, tasks, message):
    with pytest.raises(UserError, match=message):
        pretrain(tiny_config(f"train.eval_tasks={tasks}"), shards, tmp_path)
    assert not (tmp_path / "metrics.jsonl").exists() or "loss" not in (tmp_path / "metrics.jsonl").read_text()


def test_flatten_keeps_scores_and_drops_counts():
    results = {"results": {"arc_easy": {"acc": 0.5, "acc_norm": 0.25, "stderr": 0.1, "items": 8},
                           "humaneval": {"pass@1": 0.125, "items": 8, "samples": 1},
                           "piqa": {"acc": math.nan, "items": 1}},
               "core": {"centered": 0.1, "tasks": {}}}
    assert flatten(results) == {"eval/arc_easy/acc": 0.5, "eval/arc_easy/acc_norm": 0.25,
                                "eval/humaneval/pass@1": 0.125, "eval/core": 0.1}


def test_a_fine_tuning_run_is_evaluated_with_chat_prompts(tmp_path):
    from eval_fixtures import code_tokenizer

    from lmforge.eval.training import TrainingEval

    code_tokenizer(tmp_path)  # saved in tmp_path/tok, with the chat tokens
    evaluator = TrainingEval(["arc_easy"], 4, tmp_path / "tok", run_dir=tmp_path / "run")
    assert evaluator.prompt_format() == "base"  # a pre-training run
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "base.json").write_text("{}")  # what lmforge sft records
    assert evaluator.prompt_format() == "chat"
