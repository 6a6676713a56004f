"""`lmforge pretrain` under torchrun (CPU, gloo, 2 processes) against single-process runs.

The global batch of a step is the same windows whatever the number of ranks, so a 2-rank run
with train.batch_size=B per rank must reproduce a 1-process run with batch 2B (ddp, fsdp), and a
model-parallel run (pipeline, fsdp+tp: both ranks read the same batch) a 1-process run with B.
An injected NaN is rolled back on all ranks at once. Resuming from the step-4 checkpoint must
reproduce steps 5-8, under the same strategy and, for an FSDP checkpoint (gathered or sharded
with DCP), in one process.
A torchrun launch costs seconds, so there are few of them.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from train_fixtures import losses, make_shards, read_metrics, set_args

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

# n_kv_heads=2 so that tensor parallel over 2 ranks gives each whole key/value heads. Every run
# meets an injected NaN at step 6: the guard must roll all ranks back to step 4 together.
STEPS = ["train.max_steps=8", "train.checkpoint_every=4", "train.eval_every=4", "model.n_kv_heads=2",
         "debug.inject=nan@6"]
ROOT = Path(__file__).parents[1]


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def run(cmd: list[str], expect_ok: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["timeout", "180", *cmd], capture_output=True, text=True, env=env(), timeout=240)
    if expect_ok:
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]
    return proc


def pretrain(shards: Path, out: Path, *overrides: str, nproc: int = 1, resume: Path | None = None,
             expect_ok: bool = True) -> subprocess.CompletedProcess:
    """`lmforge pretrain` in one process, or under `torchrun --standalone` on nproc processes."""
    launcher = [sys.executable, "-m", "lmforge"] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
        "-m", "lmforge"]
    extra = ["--resume", str(resume)] if resume else []
    return run([*launcher, "pretrain", "--data", str(shards), "--out", str(out), *extra,
                *set_args(*STEPS, *overrides)], expect_ok)


def after(curve: dict[int, float], step: int) -> dict[int, float]:
    return {s: v for s, v in curve.items() if s > step}


def middle(run_dir: Path) -> Path:
    return run_dir / "checkpoints" / "step_00000004"


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return make_shards(tmp_path_factory.mktemp("distributed_loop"))


@pytest.fixture(scope="module")
def single(shards) -> dict[str, dict[int, float]]:
    """Single-process loss curves: global batch 8 (as 2 x 4) and 4 (as model-parallel 4)."""
    out = shards.parent
    pretrain(shards, out / "single8", "train.batch_size=8")
    pretrain(shards, out / "single4", "train.batch_size=4")
    return {name: losses(out / name) for name in ("single8", "single4")}


def assert_same_curve(got: dict[int, float], expected: dict[int, float]) -> None:
    assert list(got) == list(expected)
    assert list(got.values()) == pytest.approx(list(expected.values()), abs=2e-5)


def test_ddp_via_nproc_matches_single_process_and_resumes(shards, single, tmp_path):
    # `lmforge pretrain --nproc 2` execs torchrun; train.parallel "none" on 2 processes is DDP.
    proc = run([sys.executable, "-m", "lmforge", "pretrain", "--nproc", "2", "--data", str(shards),
                "--out", str(tmp_path / "ddp"), *set_args(*STEPS, "train.batch_size=4")])
    assert_same_curve(losses(tmp_path / "ddp"), single["single8"])
    # Rank 0 alone logs: the same metric lines as the single process (steps 5-6 twice: the
    # rollback), one final report.
    def logged_steps(run_dir: Path) -> list[int]:
        return [r["step"] for r in read_metrics(run_dir) if "loss" in r and "event" not in r]

    assert logged_steps(tmp_path / "ddp") == logged_steps(shards.parent / "single8")
    assert proc.stdout.count("step 8/8") == 1
    # Resume under DDP from the step-4 checkpoint: steps 5-8 again, exactly.
    pretrain(shards, tmp_path / "ddp_resumed", "train.batch_size=4", "train.parallel=ddp", nproc=2,
             resume=middle(tmp_path / "ddp"))
    assert_same_curve(losses(tmp_path / "ddp_resumed"), after(losses(tmp_path / "ddp"), 4))


def test_fsdp_matches_single_process_and_its_checkpoint_resumes_on_one_process(shards, single, tmp_path):
    pretrain(shards, tmp_path / "fsdp", "train.batch_size=4", "train.parallel=fsdp", nproc=2)
    fsdp = losses(tmp_path / "fsdp")
    assert_same_curve(fsdp, single["single8"])
    metrics = read_metrics(tmp_path / "fsdp")
    assert len([r for r in metrics if "val_loss" in r]) == 2
    rollbacks = [r for r in metrics if r.get("event") == "rollback"]
    assert [(r["step"], r["to_step"]) for r in rollbacks] == [(6, 4)]
    # Saved by 2 FSDP ranks, resumed by one plain process with the same global batch.
    pretrain(shards, tmp_path / "one", "train.batch_size=8", "train.parallel=none",
             resume=middle(tmp_path / "fsdp"))
    assert_same_curve(losses(tmp_path / "one"), after(fsdp, 4))
    # The checkpoint is an ordinary one: one model.safetensors with checkpoint names.
    from lmforge.checkpoint import load_model

    model = load_model(tmp_path / "fsdp" / "checkpoints" / "step_00000008")
    assert model.cfg.n_layers == 2


def test_fsdp_sharded_checkpoints_roll_back_resume_on_one_process_and_consolidate(shards, single, tmp_path):
    """train.checkpoint_format=sharded: every rank writes DCP shards; the run (with its rollback to
    a sharded checkpoint) still matches the single process, and one process resumes from it."""
    from safetensors.torch import load_file

    pretrain(shards, tmp_path / "fsdp", "train.batch_size=4", "train.parallel=fsdp",
             "train.checkpoint_format=sharded", nproc=2)
    fsdp = losses(tmp_path / "fsdp")
    assert_same_curve(fsdp, single["single8"])
    rollbacks = [r for r in read_metrics(tmp_path / "fsdp") if r.get("event") == "rollback"]
    assert [(r["step"], r["to_step"]) for r in rollbacks] == [(6, 4)]
    ckpt = middle(tmp_path / "fsdp")
    assert (ckpt / "COMPLETE").is_file() and any((ckpt / "shards").glob("*.safetensors"))
    assert not (ckpt / "optimizer.safetensors").exists()  # the optimizer lives in the shards only
    # Saved by 2 FSDP ranks, resumed by one process without a process group (DCP reshards);
    # that run keeps the checkpoint's format and writes its own sharded checkpoints alone.
    pretrain(shards, tmp_path / "one", "train.batch_size=8", "train.parallel=none", resume=ckpt)
    assert_same_curve(losses(tmp_path / "one"), after(fsdp, 4))
    # model.safetensors, joined from the shards, holds the weights the gathering path writes: at
    # step 0 exactly those of the single-process run's full checkpoint, later the same to rounding.
    def weights(run: Path, step: int) -> dict:
        return load_file(run / "checkpoints" / f"step_{step:08d}" / "model.safetensors")

    reference = shards.parent / "single8"
    assert_same_weights(weights(tmp_path / "fsdp", 0), weights(reference, 0), atol=0)
    for run in (tmp_path / "fsdp", tmp_path / "one"):
        assert_same_weights(weights(run, 8), weights(reference, 8), atol=1e-4)
    from lmforge.checkpoint import load_model

    assert load_model(tmp_path / "one" / "checkpoints" / "step_00000008").cfg.n_layers == 2


def test_fsdp_bf16_mixed_precision_trains_like_fp32_and_keeps_fp32_weights(shards, single, tmp_path):
    """train.dtype=bf16 under FSDP is the GPU default path (bf16 parameters in compute and
    communication, fp32 gradient reduction and master weights), run here on CPU ranks: it follows
    the fp32 single-process curve to bf16 precision, rolls the NaN back, and saves fp32 weights."""
    from safetensors.torch import load_file

    pretrain(shards, tmp_path / "bf16", "train.batch_size=4", "train.parallel=fsdp", "train.dtype=bf16",
             nproc=2)
    got, expected = losses(tmp_path / "bf16"), single["single8"]
    assert list(got) == list(expected)
    assert list(got.values()) == pytest.approx(list(expected.values()), rel=0.02)
    rollbacks = [r for r in read_metrics(tmp_path / "bf16") if r.get("event") == "rollback"]
    assert [(r["step"], r["to_step"]) for r in rollbacks] == [(6, 4)]
    weights = load_file(middle(tmp_path / "bf16").parent / "step_00000008" / "model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.float32}


def test_sharded_checkpoints_with_pipeline_fail_clearly():
    from train_fixtures import tiny_config

    from lmforge.errors import ConfigError

    with pytest.raises(ConfigError, match="train.checkpoint_format='sharded' does not support"):
        tiny_config("train.parallel=pipeline", "train.checkpoint_format=sharded")
    with pytest.raises(ConfigError, match="train.checkpoint_format"):
        tiny_config("train.checkpoint_format=dcp")


def assert_same_weights(got: dict, expected: dict, atol: float) -> None:
    import torch

    assert sorted(got) == sorted(expected)
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype and got[name].shape == tensor.shape, name
        torch.testing.assert_close(got[name], tensor, atol=atol, rtol=0, msg=name)


@pytest.mark.parametrize("strategy,reference,extra", [
    ("pipeline", "single4", ("train.pipeline_schedule=1f1b",)),
    ("fsdp+tp", "single4", ("train.tp_size=2",)),
])
def test_model_parallel_matches_single_process_and_resumes(shards, single, tmp_path, strategy, reference, extra):
    overrides = ("train.batch_size=4", f"train.parallel={strategy}", *extra)
    pretrain(shards, tmp_path / "run", *overrides, nproc=2)
    curve = losses(tmp_path / "run")
    assert_same_curve(curve, single[reference])
    pretrain(shards, tmp_path / "resumed", *overrides, nproc=2, resume=middle(tmp_path / "run"))
    assert_same_curve(losses(tmp_path / "resumed"), after(curve, 4))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_on_loopback_train_and_checkpoint(shards, single, tmp_path):
    """Two torchrun launches, one process each, meeting at a c10d rendezvous (as two machines)."""
    port = free_port()
    out = tmp_path / "two_nodes"
    nodes = []
    for node_rank in (0, 1):
        cmd = ["timeout", "180", sys.executable, "-m", "torch.distributed.run", "--nnodes=2",
               "--nproc_per_node=1", f"--node_rank={node_rank}", "--rdzv-backend=c10d",
               f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=lmforge-test",
               "--rdzv-conf=join_timeout=60", "-m", "lmforge", "pretrain", "--data", str(shards),
               "--out", str(out), *set_args(*STEPS, "train.batch_size=4", "train.parallel=ddp")]
        nodes.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env()))
    results = [(p.wait(timeout=240), *p.communicate()) for p in nodes]
    for code, stdout, stderr in results:
        assert code == 0, stdout[-2000:] + stderr[-6000:]
    assert_same_curve(losses(out), single["single8"])
    final = out / "checkpoints" / "step_00000008"
    assert (final / "COMPLETE").exists() and (final / "model.safetensors").exists()
    state = json.loads((final / "trainer_state.json").read_text())
    assert state["world_size"] == 2


def test_pipeline_with_layers_not_divisible_fails_clearly(shards, tmp_path):
    proc = pretrain(shards, tmp_path / "bad", "train.parallel=pipeline", "model.n_layers=3", nproc=2,
                    expect_ok=False)
    assert proc.returncode != 0
    assert "error: train.parallel='pipeline' with 2 stages needs model.n_layers divisible by 2" in proc.stderr


def test_nccl_on_a_machine_without_gpus_fails_clearly(shards, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    proc = pretrain(shards, tmp_path / "bad", "train.dist_backend=nccl", expect_ok=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: train.dist_backend='nccl' needs CUDA GPUs")
    assert "Traceback" not in proc.stderr


def test_batch_that_does_not_divide_across_ranks_fails_clearly():
    from train_fixtures import tiny_config

    from lmforge.errors import UserError
    from lmforge.train.pretrain import batch_geometry

    cfg = tiny_config("train.batch_size=4", "train.batch_tokens=384")  # 384 = 3 x 4 x 32
    assert batch_geometry(cfg, 1)[1] == 3
    with pytest.raises(UserError, match="data-parallel ranks"):
        batch_geometry(cfg, 2)
