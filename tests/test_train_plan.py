"""`lmforge plan`, --time-budget and --auto-size."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from train_fixtures import kept_for_backward, make_shards, read_metrics, tiny_config

from lmforge import accounting, plan
from lmforge.config import load_config
from lmforge.model import Transformer
from lmforge.train.pretrain import pretrain

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def test_plan_prints_the_model_s_real_parameter_count_and_the_chinchilla_time():
    proc = subprocess.run([sys.executable, "-m", "lmforge", "plan", "--preset", "tiny", "--tokens-per-s", "1000"],
                          capture_output=True, text=True, env=ENV, timeout=120)
    assert proc.returncode == 0, proc.stderr
    n = sum(p.numel() for p in Transformer(load_config(preset="tiny").model).parameters())
    assert f"parameters         {accounting.human(n)}" in proc.stdout
    # 20 tokens per parameter at 1000 tokens/s.
    hours = float(re.search(r"time to train\s+([\d.]+) h", proc.stdout).group(1))
    assert hours == pytest.approx(20 * n / 1000 / 3600, rel=0.05)


def test_plan_for_a_parameter_count_picks_the_nearest_shape_and_bad_counts_are_errors():
    shape = plan.shape_for_params(load_config().model, 20_000_000)
    n = accounting.param_counts(shape).total
    assert 10e6 < n < 40e6
    proc = subprocess.run([sys.executable, "-m", "lmforge", "plan", "--params", "lots"],
                          capture_output=True, text=True, env=ENV, timeout=120)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1


def test_auto_size_picks_the_largest_shape_whose_chinchilla_run_fits(monkeypatch):
    cfg = load_config(preset="tiny", overrides=["train.time_budget=10m"])
    rate = 5000.0  # tokens/s of the tiny model on a pretend machine
    monkeypatch.setattr(plan, "measure_tokens_per_s", lambda cfg: rate)
    seq = cfg.model.max_seq_len
    flops_per_s = rate * accounting.flops_per_token(cfg.model, seq)["training"]

    def seconds(m):
        return 20 * accounting.param_counts(m).total * accounting.flops_per_token(m, seq)["training"] / flops_per_s

    chosen = plan.auto_size(cfg).model
    shapes = plan.ladder(cfg.model)
    i = [(m.d_model, m.n_layers) for m in shapes].index((chosen.d_model, chosen.n_layers))
    assert seconds(chosen) <= 600 and seconds(shapes[i + 1]) > 600 * 0.8


@pytest.mark.slow
def test_time_budget_sizes_the_run_to_finish_in_time(tmp_path):
    shards = make_shards(tmp_path, n_docs=60)
    result = pretrain(tiny_config("train.time_budget=20s", "train.max_steps=100000",
                                  "train.eval_every=100", "train.checkpoint_every=1000"), shards, tmp_path / "run")
    events = {r["event"]: r for r in read_metrics(tmp_path / "run") if "event" in r}
    sized = events["budget"]["max_steps"]
    assert sized < 100000 and result.step <= sized
    if result.step < sized:  # the machine slowed down after measuring: the budget still holds
        assert "budget_exhausted" in events
    else:
        assert events["budget"]["tokens_budget"] == result.tokens


@pytest.mark.parametrize("head", ["plain", "fused"])
def test_activation_estimate_is_near_the_tensors_autograd_keeps(head):
    """The activation term of the memory estimate against what autograd really saves for backward
    (read off the graph, each storage once, parameters left out), for the eager head and the
    fused loss, within the margin the GPU measurement showed (benchmarks/RESULTS.md)."""
    import torch

    from lmforge.train.pretrain import loss_options

    fused = "on" if head == "fused" else "off"
    cfg = load_config(preset="tiny", overrides=["model.vocab_size=2048", f"train.fused_loss={fused}"])
    assert accounting.loss_head(cfg, "cpu") == head
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    g = torch.Generator().manual_seed(0)
    x, y = (torch.randint(0, 2048, (2, 128), generator=g) for _ in range(2))
    loss = model.loss(x, y, **loss_options(model, cfg.train, torch.device("cpu")))
    saved = kept_for_backward(loss, leave_out=[*model.parameters(), *model.buffers()])
    estimate = accounting.training_memory(cfg, 2, 128, "cpu")["activations"]
    assert 0.8 < saved / estimate < 1.25, (saved, estimate)
