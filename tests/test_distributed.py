"""Distributed strategies against a single-process reference (CPU, gloo, 2 processes).

ONE torchrun launch (tests/distributed_worker.py) checks DDP, FSDP2, pipeline (1F1B and GPipe)
and FSDP+TP in sequence: for each, the gradients of the first step and the losses of 10 AdamW
steps against a private single-process run on the same global batches, evaluation, the full
state dicts, and an exact resume from them. The remaining tests here read its results or need
no processes at all (layout errors, a 2-rank sharded checkpoint loaded in one process).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmforge.config import load_config
from lmforge.distributed import ProcessEnv, check_layout, init_parallel
from lmforge.distributed.runtime import choose_backend
from lmforge.errors import UserError

sys.path.insert(0, str(Path(__file__).parent))
import distributed_worker  # noqa: E402

STRATEGIES = ["ddp", "ddp_accumulate", "fsdp", "pipeline_1f1b", "pipeline_gpipe_untied", "fsdp+tp"]


def torchrun_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}


@pytest.fixture(scope="module")
def worker_results(tmp_path_factory) -> tuple[dict, Path]:
    workdir = tmp_path_factory.mktemp("distributed")
    out = workdir / "results.json"
    cmd = ["timeout", "240", sys.executable, "-m", "torch.distributed.run", "--standalone",
           "--nproc_per_node=2", str(Path(distributed_worker.__file__)), str(out), str(workdir)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=torchrun_env(), timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads(out.read_text()), workdir


pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def test_pipeline_replicated_by_data_parallel_matches_single_process(tmp_path):
    """4 processes: 2 pipeline stages x 2 DDP replicas, 2 accumulation micro-steps per step."""
    out = tmp_path / "results.json"
    cmd = ["timeout", "240", sys.executable, "-m", "torch.distributed.run", "--standalone",
           "--nproc_per_node=4", str(Path(distributed_worker.__file__)), str(out), str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=torchrun_env(), timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    r = json.loads(out.read_text())["pipeline_x_dp"]
    assert (r["strategy"], r["dp_size"]) == ("pipeline", 2)
    assert r["grad_diff_step1"] <= 1e-5 and r["eval_diff"] <= 1e-5 and r["weights_diff"] <= 1e-4
    assert r["losses"] == pytest.approx(r["ref_losses"], abs=1e-5)
    assert r["optimizer_keys_match"] and r["resume_diff"] == 0.0


@pytest.mark.parametrize("name", STRATEGIES)
def test_first_step_gradients_equal_single_process(worker_results, name):
    results, _ = worker_results
    assert results[name]["grad_diff_step1"] <= 1e-5


@pytest.mark.parametrize("name", STRATEGIES)
def test_loss_curve_over_10_steps_matches_single_process(worker_results, name):
    r = worker_results[0][name]
    assert len(r["losses"]) == 10
    assert r["losses"] == pytest.approx(r["ref_losses"], abs=1e-5)
    assert r["weights_diff"] <= 1e-4  # after 10 AdamW steps, full weights gathered on rank 0


@pytest.mark.parametrize("name", STRATEGIES)
def test_evaluation_and_optimizer_state_under_checkpoint_names(worker_results, name):
    r = worker_results[0][name]
    assert r["eval_diff"] <= 1e-5
    assert r["optimizer_keys_match"]


@pytest.mark.parametrize("name", STRATEGIES)
def test_resume_from_full_state_continues_exactly(worker_results, name):
    assert worker_results[0][name]["resume_diff"] == 0.0


def test_data_parallel_ranks_split_the_batch_and_model_parallel_ranks_share_it(worker_results):
    r = worker_results[0]
    assert r["ddp"]["dp_size"] == 2 and r["fsdp"]["dp_size"] == 2
    assert r["pipeline_1f1b"]["dp_size"] == 1 and r["fsdp+tp"]["dp_size"] == 1


def test_fsdp_sharded_checkpoint_consolidates_and_loads_on_one_process(worker_results):
    from safetensors.torch import load_file

    from lmforge.distributed.checkpoint import consolidate, load_sharded
    from lmforge.model import Transformer
    from lmforge.train.optim import build_optimizer

    r, workdir = worker_results
    assert r["fsdp"]["consolidated_diff"] == 0.0  # consolidated file == gathered full state
    assert r["fsdp"]["sharded_reload_diff"] == 0.0  # shards reload on 2 ranks
    shards = sorted(p.name for p in (workdir / "dcp").glob("*.safetensors"))
    assert len(shards) == 2  # one file per rank, written in parallel
    # Saved on 2 ranks, loaded here in one plain process (no process group).
    cfg = distributed_worker.config("none")
    model = Transformer(cfg.model)
    optimizer = build_optimizer(model, cfg.train, torch.device("cpu"))
    load_sharded(workdir / "dcp", model, optimizer)
    consolidated = load_file(workdir / "consolidated.safetensors")
    assert set(consolidated) == set(model.state_dict())
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, consolidated[name], rtol=0, atol=0)
    steps = {float(s["step"]) for s in optimizer.state.values()}
    assert steps == {13.0}  # 10 steps + 3 more before the save
    # The consolidated file is also reproducible from the shards in this process.
    again = consolidate(workdir / "dcp", workdir / "again.safetensors")
    assert load_file(again).keys() == consolidated.keys()


# ---- clear errors, no processes needed


def _cfg(*overrides: str):
    return load_config(overrides=list(overrides))


def test_pipeline_needs_layers_divisible_by_world_size():
    cfg = _cfg("model.n_layers=3", "train.parallel=pipeline")
    with pytest.raises(UserError, match="2 stages needs model.n_layers divisible by 2"):
        check_layout(cfg, "pipeline", 2)
    # Fewer stages than processes replicate the pipeline: 3 layers on 3 stages x 2 replicas.
    check_layout(_cfg("model.n_layers=3", "train.parallel=pipeline", "train.pipeline_stages=3"), "pipeline", 6)
    with pytest.raises(UserError, match="pipeline_stages=4 must divide the number of processes 6"):
        check_layout(_cfg("train.parallel=pipeline", "train.pipeline_stages=4"), "pipeline", 6)
    # init_parallel refuses before joining any process group (no peer needed to fail).
    env = ProcessEnv(rank=0, world_size=2, local_rank=0, launched=True)
    with pytest.raises(UserError, match="n_layers"):
        init_parallel(cfg, env)


def test_tensor_parallel_needs_whole_kv_heads():
    cfg = _cfg("model.n_heads=4", "model.n_kv_heads=1", "train.parallel=fsdp+tp", "train.tp_size=2")
    with pytest.raises(UserError, match="n_kv_heads"):
        check_layout(cfg, "fsdp+tp", 2)
    with pytest.raises(UserError, match="tp_size=2 must divide the world size 3"):
        check_layout(_cfg("train.parallel=fsdp+tp"), "fsdp+tp", 3)


def test_nccl_without_gpu_is_a_user_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(UserError, match="nccl.*needs CUDA GPUs"):
        choose_backend("nccl", torch.device("cpu"))
    cfg = _cfg("train.dist_backend=nccl", "train.parallel=ddp")
    with pytest.raises(UserError, match="nccl"):
        init_parallel(cfg, ProcessEnv(rank=0, world_size=2, local_rank=0, launched=True))


def test_pipeline_microbatches_must_divide_batch():
    with pytest.raises(UserError, match="pipeline_microbatches=4 must divide train.batch_size=6"):
        _cfg("train.parallel=pipeline", "train.batch_size=6")


def test_single_process_seam_is_the_plain_model():
    cfg = _cfg(*distributed_worker.MODEL, "train.device=cpu")
    par = init_parallel(cfg, ProcessEnv())
    assert (par.name, par.rank, par.world_size, par.dp_size, par.is_main) == ("none", 0, 1, 1, True)
    from lmforge.model import Transformer

    torch.manual_seed(0)
    model = Transformer(cfg.model)
    assert par.parallelize(model) is model
    x = torch.randint(0, 96, (2, 8))
    loss = par.forward_backward(model, x, x, loss_scale=0.5)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    (0.5 * model.loss(x, x)).backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad)
    assert not loss.requires_grad
    norm = par.clip_grad_norm(model, 1e-3)
    assert float(norm) > 1e-3
    assert float(torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])) == pytest.approx(1e-3, rel=1e-4)
    assert float(par.all_reduce(torch.tensor(3.0), "sum")) == 3.0


def test_consolidate_command_end_to_end(worker_results, tmp_path):
    from safetensors.torch import load_file

    _, workdir = worker_results
    out = tmp_path / "model.safetensors"
    proc = subprocess.run([sys.executable, "-m", "lmforge", "checkpoint", "consolidate",
                           str(workdir / "dcp"), "--out", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    expected = load_file(workdir / "consolidated.safetensors")
    got = load_file(out)
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in got)
    bad = subprocess.run([sys.executable, "-m", "lmforge", "checkpoint", "consolidate",
                          str(tmp_path / "missing"), "--out", str(tmp_path / "new.safetensors")],
                         capture_output=True, text=True)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'missing'}: no sharded checkpoint here (no .safetensors files)"]
