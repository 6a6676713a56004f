"""`train.compile` also compiles `model.head_loss`: same loss and gradients as eager (the truth),
and a pipeline stage without the final norm is left alone."""

from __future__ import annotations

import torch

from lmforge.config import ModelConfig
from lmforge.model import Transformer
from lmforge.train.pretrain import compile_head_loss


def _model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=128, d_model=32, n_layers=1, n_heads=2, max_seq_len=16))


def test_compiled_head_loss_matches_eager():
    eager, compiled = _model(), _model()
    compile_head_loss(compiled)
    assert "head_loss" in vars(compiled)  # the instance now holds a compiled callable
    x = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(2))
    for m in (eager, compiled):
        m.loss(x, y).backward()
    torch.testing.assert_close(compiled.loss(x, y), eager.loss(x, y))
    for (name, a), (_, b) in zip(compiled.named_parameters(), eager.named_parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, msg=name)
    assert set(compiled.state_dict()) == set(eager.state_dict())  # checkpoint names unchanged


def test_stage_without_norm_is_not_compiled():
    stage = _model()
    stage.norm = None
    compile_head_loss(stage)
    assert "head_loss" not in vars(stage)
