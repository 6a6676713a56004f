"""`train.compile` also compiles the final norm + head + loss: the pre-training objective holds the
compiled callable (the model is not changed), same loss and gradients as eager (the truth), and a
pipeline stage without the final norm gets none."""

from __future__ import annotations

import torch

from lmforge.config import ModelConfig, TrainConfig
from lmforge.model import Transformer, loss_positions
from lmforge.train.pretrain import head_loss_for

COMPILED = TrainConfig(compile=True, fused_loss="off")


def _model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=128, d_model=32, n_layers=1, n_heads=2, max_seq_len=16))


def test_compiled_head_loss_matches_eager():
    eager, compiled = _model(), _model()
    head_loss = head_loss_for(compiled, COMPILED, torch.device("cpu"))
    assert head_loss is not None
    assert "head_loss" not in vars(compiled)  # the callable is the objective's, not the model's
    x = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(2))
    eager.loss(x, y).backward()
    compiled.loss(x, y, head_loss=head_loss).backward()
    torch.testing.assert_close(compiled.loss(x, y, head_loss=head_loss), eager.loss(x, y))
    for (name, a), (_, b) in zip(compiled.named_parameters(), eager.named_parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, msg=name)
    assert set(compiled.state_dict()) == set(eager.state_dict())  # checkpoint names unchanged


def test_stage_without_norm_is_not_compiled():
    stage = _model()
    stage.norm = None
    assert head_loss_for(stage, COMPILED, torch.device("cpu")) is None


def test_one_compilation_serves_every_block_across_lengths():
    """SFT's rows change length every batch: compiled blocks must be compiled once with a static
    length, once with a dynamic one, and shared by every layer - not once per layer (which ran
    into dynamo's recompile limit of 8 and fell back to eager)."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=128, d_model=32, n_layers=4, n_heads=2, max_seq_len=32))
    counter = CompileCounter()
    for block in model.layers.values():
        block.compile(backend=counter)
    for length in (9, 13, 21, 30):
        x = torch.randint(0, 128, (2, length))
        model.loss(x, x).backward()
        # SFT's loss at the assistant targets: the rows are selected outside the compiled blocks
        # (a variant of the last block with them would be compiled twice more).
        y = x.masked_fill(torch.arange(length) < length // 2, -100)
        model.loss(x, y, positions=loss_positions(y)).backward()
    assert counter.frame_count == 2
    torch._dynamo.reset()
