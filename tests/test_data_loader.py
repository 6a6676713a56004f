"""TokenLoader: windows, epochs, exact resumption, rank-disjoint shares of one global batch."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lmforge.data.loader import TokenLoader
from lmforge.data.shards import write_shard
from lmforge.errors import UserError

SEQ = 8
SHARD_SIZES = (203, 150, 97)  # windows: 25 + 18 + 12 = 55


@pytest.fixture
def shards(tmp_path):
    """Shards whose token at global position p is p % 5000: every window is recognisable."""
    start = 0
    for i, n in enumerate(SHARD_SIZES):
        write_shard(tmp_path / f"train_{i:06d}.bin", np.arange(start, start + n) % 5000, 5000)
        start += n
    return tmp_path


def window_ids(x: torch.Tensor) -> list[int]:
    """Identify each row by its first token (unique here)."""
    return x[:, 0].tolist()


def all_windows() -> set[int]:
    starts, offset = set(), 0
    for n in SHARD_SIZES:
        starts |= {offset + k * SEQ for k in range((n - 1) // SEQ)}
        offset += n
    return starts


def take(loader: TokenLoader, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [loader.next_batch() for _ in range(n)]


def test_windows_are_shifted_pairs_from_the_shards(shards):
    loader = TokenLoader(shards, "train", seq_len=SEQ, batch_size=5, shuffle=False)
    assert loader.windows_per_epoch == len(all_windows()) == 55
    x, y = loader.next_batch()
    assert x.dtype == y.dtype == torch.long and x.shape == (5, SEQ)
    assert torch.equal(x[:, 1:], y[:, :-1]) and torch.equal(y[:, -1], x[:, -1] + 1)
    assert window_ids(x) == [0, 8, 16, 24, 32]  # sequential order
    seen = [w for x, _ in take(loader, 10) for w in window_ids(x)]
    assert set(seen) | {0, 8, 16, 24, 32} == all_windows()  # 11 batches = one whole epoch


def test_each_epoch_is_a_fresh_permutation(shards):
    loader = TokenLoader(shards, "train", seq_len=SEQ, batch_size=11, seed=3)
    epochs = [[w for x, _ in take(loader, 5) for w in window_ids(x)] for _ in range(2)]
    for order in epochs:
        assert sorted(order) == sorted(all_windows())
    assert epochs[0] != epochs[1]
    again = TokenLoader(shards, "train", seq_len=SEQ, batch_size=11, seed=3)
    assert [w for x, _ in take(again, 5) for w in window_ids(x)] == epochs[0]


def test_resume_yields_exactly_the_next_batches(shards):
    full = TokenLoader(shards, "train", seq_len=SEQ, batch_size=6, seed=1)
    take(full, 7)
    state = json.loads(json.dumps(full.state_dict()))  # JSON round trip, as in a checkpoint
    expected = take(full, 12)  # crosses the end of the epoch (9 batches of 6 per epoch)
    resumed = TokenLoader(shards, "train", seq_len=SEQ, batch_size=6, seed=1)
    resumed.load_state_dict(state)
    for (x, y), (rx, ry) in zip(expected, take(resumed, 12)):
        assert torch.equal(x, rx) and torch.equal(y, ry)


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_share_one_global_batch_and_never_repeat_a_window(shards, world_size):
    single = TokenLoader(shards, "train", seq_len=SEQ, batch_size=6, seed=5)
    ranks = [TokenLoader(shards, "train", seq_len=SEQ, batch_size=6, seed=5, rank=r,
                         world_size=world_size) for r in range(world_size)]
    per_rank: list[list[int]] = [[] for _ in ranks]
    for _ in range(9):  # one epoch
        x, _ = single.next_batch()
        parts = [loader.next_batch()[0] for loader in ranks]
        assert all(p.shape == (6 // world_size, SEQ) for p in parts)
        assert torch.equal(torch.cat(parts), x)  # same global batch whatever the world size
        for r, p in enumerate(parts):
            per_rank[r] += window_ids(p)
    for r in range(world_size):
        for s in range(r + 1, world_size):
            assert not set(per_rank[r]) & set(per_rank[s])
    assert sum(len(w) for w in per_rank) == len(set().union(*map(set, per_rank))) == 54


def test_prefetching_loader_resumes_exactly(shards):
    """The prefetch thread (used on CUDA) runs ahead; the state must count delivered batches only."""
    plain = TokenLoader(shards, "train", seq_len=SEQ, batch_size=6, seed=4)
    expected = take(plain, 15)
    ahead = TokenLoader(shards, "train", seq_len=SEQ, batch_size=6, seed=4, prefetch=True)
    got = take(ahead, 5)
    state = ahead.state_dict()
    got += take(ahead, 4)
    resumed = TokenLoader(shards, "train", seq_len=SEQ, batch_size=6, seed=4, prefetch=True)
    resumed.load_state_dict(state)
    again = take(resumed, 10)
    ahead.close()
    resumed.close()
    for (x, _), (gx, _) in zip(expected, got):
        assert torch.equal(x, gx)
    for (x, _), (rx, _) in zip(expected[5:], again):
        assert torch.equal(x, rx)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_batches_equal_cpu_batches(shards):
    cpu = TokenLoader(shards, "train", seq_len=SEQ, batch_size=6, seed=4)
    gpu = TokenLoader(shards, "train", seq_len=SEQ, batch_size=6, seed=4, device="cuda")
    for (x, y), (gx, gy) in zip(take(cpu, 12), take(gpu, 12)):
        assert gx.is_cuda and torch.equal(x, gx.cpu()) and torch.equal(y, gy.cpu())
    assert gpu.state_dict() == cpu.state_dict()
    gpu.close()


def test_resume_on_a_different_world_size(shards):
    one = TokenLoader(shards, "train", seq_len=SEQ, batch_size=4, seed=2)
    take(one, 5)
    state = one.state_dict()
    expected = take(one, 4)
    two = [TokenLoader(shards, "train", seq_len=SEQ, batch_size=4, seed=2, rank=r, world_size=2)
           for r in range(2)]
    for loader in two:
        loader.load_state_dict(state)
    for x, _ in expected:
        assert torch.equal(torch.cat([loader.next_batch()[0] for loader in two]), x)


def test_clear_errors(shards):
    with pytest.raises(UserError, match="divisible by world_size=4"):
        TokenLoader(shards, "train", seq_len=SEQ, batch_size=6, world_size=4)
    with pytest.raises(UserError, match="fewer than one global batch of 64"):
        TokenLoader(shards, "train", seq_len=SEQ, batch_size=64)
    with pytest.raises(UserError, match="no val shards"):
        TokenLoader(shards, "val", seq_len=SEQ, batch_size=2)
    loader = TokenLoader(shards, "train", seq_len=SEQ, batch_size=2)
    with pytest.raises(UserError, match="seq_len was 16"):
        loader.load_state_dict({**loader.state_dict(), "seq_len": 16})


@pytest.mark.parametrize("vocab_size, itemsize", [(300, 2), (65535, 2), (65536, 4), (128256, 4)])
def test_shard_file_layout(tmp_path, vocab_size, itemsize):
    import struct
    import zlib

    from lmforge.data.shards import open_shard

    tokens = np.random.default_rng(0).integers(0, vocab_size, 1000)
    path = tmp_path / "train_000000.bin"
    write_shard(path, tokens, vocab_size)
    raw = path.read_bytes()
    # The documented layout, read independently of lmforge.data.shards.
    magic, version, size, count, crc, vocab = struct.unpack("<8sIIQII", raw[:32])
    assert (magic, version, size, count, vocab) == (b"LMFSHARD", 1, itemsize, 1000, vocab_size)
    assert crc == zlib.crc32(raw[32:]) and len(raw) == 32 + 1000 * itemsize
    assert np.array_equal(np.frombuffer(raw[32:], dtype=f"<u{itemsize}"), tokens)
    assert np.array_equal(open_shard(path), tokens)
    path.write_bytes(b"NOTSHARD" + raw[8:])
    with pytest.raises(UserError, match=f"{path}: not an lmforge token shard"):
        open_shard(path)
