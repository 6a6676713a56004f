"""Memory per device by strategy (`lmforge plan --world-size/--parallel/--gpu-mem`) and the
`--nproc` launcher: arithmetic checked against real models, no processes started."""

from __future__ import annotations

import subprocess
import sys

import pytest

from lmforge import accounting
from lmforge.config import load_config
from lmforge.distributed.launch import strip_nproc, torchrun_command
from lmforge.distributed.memory import memory_per_device, parse_memory
from lmforge.distributed.pipeline import split_stage
from lmforge.errors import UserError
from lmforge.model import Transformer

SHAPE = ["model.vocab_size=512", "model.d_model=64", "model.n_layers=4", "model.n_heads=4",
         "model.n_kv_heads=2", "model.max_seq_len=64", "train.batch_size=8"]


def n_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("tie", ["true", "false"])
def test_replicated_and_sharded_weights_match_the_real_model(tie):
    cfg = load_config(overrides=[*SHAPE, f"model.tie_embeddings={tie}"])
    n = n_params(Transformer(cfg.model))
    ddp = memory_per_device(cfg, "ddp", 2)
    assert (ddp.weights, ddp.grads, ddp.optimizer) == (4 * n, 4 * n, 8 * n)
    fsdp = memory_per_device(cfg, "fsdp", 4)
    assert fsdp.weights == 4 * -(-n // 4) and fsdp.optimizer == 2 * fsdp.weights
    assert fsdp.gathered > 0 and fsdp.total < ddp.total
    # Activations of a replica are the single-device figure for the same per-device batch.
    assert ddp.activations == accounting.memory_bytes(cfg.model, 8, 64)["activations"]


@pytest.mark.parametrize("tie", ["true", "false"])
@pytest.mark.parametrize("stages", [2, 4])
def test_pipeline_weights_are_the_largest_real_stage(tie, stages):
    cfg = load_config(overrides=[*SHAPE, f"model.tie_embeddings={tie}"])
    largest = max(n_params(split_stage(Transformer(cfg.model), stages, s)) for s in range(stages))
    assert memory_per_device(cfg, "pipeline", stages).weights == 4 * largest


def test_pipeline_schedules_and_tensor_parallel_activations():
    cfg = load_config(overrides=[*SHAPE, "train.pipeline_microbatches=8"])
    gpipe = load_config(overrides=[*SHAPE, "train.pipeline_microbatches=8", "train.pipeline_schedule=gpipe"])
    # 1F1B keeps at most one micro-batch per stage in flight, GPipe all eight.
    assert memory_per_device(cfg, "pipeline", 2).activations < memory_per_device(gpipe, "pipeline", 2).activations
    tp = load_config(overrides=[*SHAPE, "train.tp_size=2"])
    assert memory_per_device(tp, "fsdp+tp", 2).activations < memory_per_device(tp, "fsdp", 2).activations


def test_impossible_layouts_and_bad_sizes_are_user_errors():
    cfg = load_config(overrides=SHAPE)
    with pytest.raises(UserError, match="n_layers divisible by 3"):
        memory_per_device(cfg, "pipeline", 3)
    with pytest.raises(UserError, match="n_kv_heads"):
        memory_per_device(load_config(overrides=[*SHAPE, "train.tp_size=4"]), "fsdp+tp", 4)
    assert parse_memory("80GB") == parse_memory("80GiB") == 80 * 2**30
    assert parse_memory("512MiB") == 512 * 2**20
    with pytest.raises(UserError, match="--gpu-mem"):
        parse_memory("lots")


@pytest.mark.slow
def test_plan_command_prints_which_strategies_fit():
    cmd = [sys.executable, "-m", "lmforge", "plan", "--preset", "llama-7b", "--tokens-per-s", "1000",
           "--world-size", "8", "--gpu-mem", "80GB"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    rows = {line.split()[0]: line for line in proc.stdout.splitlines() if line.startswith("  ")}
    assert rows["ddp"].endswith("no")  # 7B with AdamW state does not fit 80 GB replicated
    assert rows["fsdp"].endswith("yes")
    bad = subprocess.run([*cmd[:-1], "eighty"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("error: --gpu-mem 'eighty'")
    assert "Traceback" not in bad.stderr


def test_nproc_becomes_a_standalone_torchrun_of_the_same_command():
    argv = ["pretrain", "--data", "d", "--nproc", "4", "--out", "o", "--nproc=2", "--set", "train.parallel=fsdp"]
    assert strip_nproc(argv) == ["pretrain", "--data", "d", "--out", "o", "--set", "train.parallel=fsdp"]
    cmd = torchrun_command(4, argv)
    assert cmd[1:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4", "-m"]
    assert cmd[6:] == ["lmforge", *strip_nproc(argv)]
    with pytest.raises(UserError, match="--nproc=0"):
        torchrun_command(0, argv)
