"""LoRA: low-rank adapters on a `Transformer`, applied from outside the model.

A targeted `nn.Linear` (weight W, out x in) is replaced by a `LoRALinear` that keeps W frozen and
adds a trained low-rank update (Hu et al. 2021):

    y = x W^T + b + (alpha / r) * dropout(x) A^T B^T        A: r x in, B: out x r

B starts at zero, so the adapted model starts equal to the base; A starts like peft's (Kaiming
uniform). The wrapper keeps the base tensors' names (`layers.0.self_attn.q_proj.weight`) and adds
`...q_proj.lora_A` / `...q_proj.lora_B`, so a LoRA model's base weights load and save like any.

    apply_lora(model, cfg.lora)      freeze the base, add adapters (rank 0: full fine-tuning)
    trainable_parameters(model)      what the optimizer gets; describe_trainable(model) says how much
    merge(model) / unmerge(model)    fold W + (alpha/r) B A in place and back, exactly
    merge_lora(model)                for good: plain nn.Linear layers, a plain Transformer again
    adapter_state / load_adapters    the trained tensors alone, by name

A LoRA checkpoint directory holds the adapters and a reference to its base instead of the full
weights (`write_lora_files`, `load_lora_model`; layout in docs/ARCHITECTURE.md):

    CKPT_DIR/config.json         the usual lmforge checkpoint config (its `lora` section: rank > 0)
    CKPT_DIR/lora.safetensors    the trained tensors: lora_A / lora_B per target, plus the
                                 embeddings / head when lora.train_embeddings / train_head
    CKPT_DIR/lora.json           {"format": "lmforge-lora", "version": 1,
                                  "base": {"checkpoint": ABSOLUTE_DIR, "sha256": of its model.safetensors}}
    CKPT_DIR/tokenizer/          optional, as in any checkpoint

`lmforge.load_model` on such a directory loads the base, checks its hash, applies the adapters and
merges them: sample, export hf and later stages see a plain model.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.atomic import atomic_directory, atomic_write_json
from lmforge.config import LoraConfig, RunConfig
from lmforge.errors import UserError

if TYPE_CHECKING:
    from lmforge.model import Transformer

# lora.targets name -> the module's path inside a block (Hugging Face Llama names).
TARGET_MODULES = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}
LORA_FORMAT = "lmforge-lora"
LORA_VERSION = 1
LORA_WEIGHTS = "lora.safetensors"
LORA_META = "lora.json"


# --------------------------------------------------------------------------------------------
# The adapted layer


class _MergedProduct(torch.autograd.Function):
    """y = x (W + s B A)^T + b for a frozen W (and b), with the gradients of x, A and B.

    Autograd on y = x W^T + s (x A^T) B^T runs five products forward and backward besides the
    two large ones (x W^T and its input gradient) and adds two (tokens x features) tensors. Here
    the update is folded into one weight, W + s B A (out x in: a product of rank r, no pass over
    the tokens), so x meets a single matrix in both directions; only A's and B's own gradients
    need the low-rank factors:

        grad_x = grad_y (W + s B A)      grad_A = s (grad_y B)^T x      grad_B = s grad_y^T (x A^T)
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_A: torch.Tensor,
                lora_B: torch.Tensor, scale: float) -> torch.Tensor:
        u = F.linear(x, lora_A)  # (..., r): B's gradient needs it
        # The merged weight is made again in backward rather than kept: a copy of every adapted
        # weight held until backward would cost as much memory as the frozen base itself.
        ctx.save_for_backward(x, weight, lora_A, lora_B, u)
        ctx.scale = scale
        return F.linear(x, torch.addmm(weight, lora_B, lora_A, alpha=scale), bias)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        x, weight, lora_A, lora_B, u = ctx.saved_tensors
        g = grad_y.reshape(-1, grad_y.shape[-1])
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_y @ torch.addmm(weight, lora_B, lora_A, alpha=ctx.scale)
        grad_A = (g @ lora_B).t().mm(x.reshape(-1, x.shape[-1])).mul_(ctx.scale)
        grad_B = g.t().mm(u.reshape(-1, u.shape[-1])).mul_(ctx.scale)
        return grad_x, None, None, grad_A, grad_B, None


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trained rank-r update (see the module docstring).

    The adapters are fp32 when the base is bf16/fp16 (their updates are small next to W, and
    AdamW on bf16 parameters would round most of them away); their output is cast back to the
    base path's dtype, and under autocast the products run in the autocast dtype like any layer's.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float) -> None:
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        dtype = torch.float32 if base.weight.dtype in (torch.float16, torch.bfloat16) else base.weight.dtype
        factory = dict(device=base.weight.device, dtype=dtype)
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, **factory))
        # peft's initialisation of A (nn.Linear's default); B = 0 makes the update start at zero.
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.rank, self.alpha = rank, alpha
        self.scale = alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.base_weight: torch.Tensor | None = None  # W itself, kept aside while merged

    @property
    def merged(self) -> bool:
        return self.base_weight is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:  # the update is inside self.weight
            return F.linear(x, self.weight, self.bias)
        if self._one_product(x):
            return _MergedProduct.apply(x, self.weight, self.bias, self.lora_A, self.lora_B, self.scale)
        if torch.is_autocast_enabled(x.device.type):
            # x cast once for both products (autocast would cast it for each, and again in the
            # backward); the adapters' products then run in the autocast dtype like the base's.
            x = x.to(torch.get_autocast_dtype(x.device.type))
            u = F.linear(self.dropout(x), self.lora_A)  # (..., r)
        else:
            u = F.linear(self.dropout(x).to(self.lora_A.dtype), self.lora_A)
        y = F.linear(x, self.weight, self.bias)
        if u.dtype != y.dtype:  # a bf16 base under fp32 adapters, without autocast
            return y + F.linear(u, self.lora_B * self.scale).to(y.dtype)
        # y + scale u B^T as one product that adds into y (BLAS beta = 1, alpha = scale): no
        # separate pass to add, and the scale costs no pass of its own.
        return torch.addmm(y.flatten(0, -2), u.flatten(0, -2), self.lora_B.t(), alpha=self.scale).view(y.shape)

    def _one_product(self, x: torch.Tensor) -> bool:
        """Whether `_MergedProduct` computes this forward: the adapters see x itself (no dropout
        while training), one dtype throughout and no autocast, the base frozen (as apply_lora
        leaves it). Otherwise the plain two-path form below."""
        return (not (self.training and isinstance(self.dropout, nn.Dropout))
                and x.dtype == self.weight.dtype == self.lora_A.dtype
                and not torch.is_autocast_enabled(x.device.type)
                and not self.weight.requires_grad
                and (self.bias is None or not self.bias.requires_grad))

    def delta(self) -> torch.Tensor:
        """(alpha / r) B A in the adapters' dtype (fp32 or wider): what merging adds to W."""
        return (self.lora_B.detach() @ self.lora_A.detach()) * self.scale

    @torch.no_grad()
    def merge(self) -> None:
        """W <- W + (alpha/r) B A, keeping W aside so `unmerge` restores it bit for bit
        (subtracting the update again would round). Costs a copy of W while merged."""
        if not self.merged:
            self.base_weight = self.weight.detach().clone()
            self.weight.copy_(self.weight.to(self.lora_A.dtype) + self.delta())

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.base_weight is not None:
            self.weight.copy_(self.base_weight)
            self.base_weight = None

    def merged_linear(self) -> nn.Linear:
        """A plain nn.Linear holding W + (alpha/r) B A (in W's dtype and device)."""
        weight = self.weight.detach() if self.merged else self.weight.detach().to(self.lora_A.dtype) + self.delta()
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device="meta")
        linear.weight = nn.Parameter(weight.to(self.weight.dtype))
        if self.bias is not None:
            linear.bias = nn.Parameter(self.bias.detach())
        return linear

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, alpha={self.alpha}"


# --------------------------------------------------------------------------------------------
# Applying, inspecting, merging


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """The adapted layers by module name, e.g. {"layers.0.self_attn.q_proj": LoRALinear}."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def target_paths(model: nn.Module, targets: list[str]) -> list[str]:
    """Module names of the targeted linear layers in every block; a target the model does not
    have (e.g. "gate" in the gpt2 arch, whose MLP has no gate) is a UserError."""
    blocks = getattr(model, "layers", None)
    if not isinstance(blocks, nn.ModuleDict) or not len(blocks):
        raise UserError("LoRA needs a lmforge Transformer with transformer blocks (model.layers)")
    first = next(iter(blocks.values()))
    present = [t for t in TARGET_MODULES if isinstance(_submodule(first, TARGET_MODULES[t]), nn.Linear)]
    missing = [t for t in targets if t not in present]
    if missing:
        arch = getattr(getattr(model, "cfg", None), "arch", "?")
        raise UserError(f"lora.targets: {', '.join(map(repr, missing))} is not a layer of this model "
                        f"(model.arch={arch!r} has {', '.join(present)}); e.g. "
                        f"--set lora.targets={','.join(present)}")
    return [f"layers.{i}.{TARGET_MODULES[t]}" for i in blocks for t in targets]


def _submodule(root: nn.Module, path: str) -> nn.Module | None:
    module: nn.Module | None = root
    for part in path.split("."):
        module = getattr(module, part, None)
    return module


def apply_lora(model: nn.Module, cfg: LoraConfig) -> nn.Module:
    """Prepare `model` for fine-tuning, in place, and return it.

    rank 0: full fine-tuning, every parameter trains and nothing is added. rank > 0: every
    parameter is frozen, each targeted layer gets adapters (trainable), and the embeddings / head
    train in full when `train_embeddings` / `train_head` say so. Seed torch first: A is random."""
    if lora_layers(model):
        raise ValueError("the model already has LoRA adapters")
    if cfg.rank == 0:
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    paths = target_paths(model, cfg.targets)
    for p in model.parameters():
        p.requires_grad_(False)
    for path in paths:
        parent_path, _, name = path.rpartition(".")
        parent = model.get_submodule(parent_path)
        setattr(parent, name, LoRALinear(getattr(parent, name), cfg.rank, cfg.alpha, cfg.dropout))
    for module in _fully_trained_modules(model, cfg):
        module.requires_grad_(True)
    return model


def _fully_trained_modules(model: nn.Module, cfg: LoraConfig) -> list[nn.Module]:
    """Modules that train in full beside the adapters: embeddings and/or head, as configured.
    With tied embeddings the head is embed_tokens, so `train_head` trains that matrix."""
    tied = getattr(model, "lm_head", None) is None
    names = []
    if cfg.train_embeddings or (cfg.train_head and tied):
        names += ["embed_tokens", "embed_positions"]
    if cfg.train_head and not tied:
        names.append("lm_head")
    return [m for m in (getattr(model, n, None) for n in names) if m is not None]


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters that train (requires_grad), by name: what an optimizer should get."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def describe_trainable(model: nn.Module) -> str:
    """One line, e.g. "0.41% of 1.30M parameters train (5.38K)"; the total includes adapters."""
    from lmforge.accounting import human

    total = sum(p.numel() for p in model.parameters())
    trained = sum(p.numel() for p in trainable_parameters(model).values())
    share = trained / total if total else 0.0
    return f"{share:.2%} of {human(total)} parameters train ({human(trained)})"


def merge(model: nn.Module) -> None:
    """Fold every adapter into its layer's weight, in place; `unmerge` undoes it exactly."""
    for layer in lora_layers(model).values():
        layer.merge()


def unmerge(model: nn.Module) -> None:
    """Restore the base weights of every merged layer, bit for bit."""
    for layer in lora_layers(model).values():
        layer.unmerge()


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace each adapted layer by a plain nn.Linear holding W + (alpha/r) B A, in place, and
    make every parameter trainable again: the model is then a plain Transformer, as
    `load_model` returns one, whose state dict is a plain checkpoint's."""
    for path, layer in lora_layers(model).items():
        parent_path, _, name = path.rpartition(".")
        setattr(model.get_submodule(parent_path), name, layer.merged_linear())
    for p in model.parameters():
        p.requires_grad_(True)
    return model


# --------------------------------------------------------------------------------------------
# Adapter tensors


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trained tensors of a LoRA model by parameter name: every lora_A / lora_B and the
    embeddings / head when they train. (With rank 0 that would be the whole model: save a
    plain checkpoint instead.)"""
    if not lora_layers(model):
        raise ValueError("the model has no LoRA adapters")
    return {name: p.detach() for name, p in trainable_parameters(model).items()}


def load_adapters(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy adapter tensors into a model prepared by `apply_lora` with the same lora config;
    one line names the first tensor that is missing, unexpected or of the wrong shape."""
    expected = trainable_parameters(model)
    for name, p in expected.items():
        if name not in state:
            raise UserError(f"{source}: tensor {name!r} is missing (the lora config expects it)")
        if state[name].shape != p.shape:
            raise UserError(f"{source}: tensor {name!r} has shape {list(state[name].shape)}, "
                            f"but the lora config expects {list(p.shape)}")
    for name in state:
        if name not in expected:
            raise UserError(f"{source}: unexpected tensor {name!r} (not trained under its lora config)")
    with torch.no_grad():
        for name, p in expected.items():
            p.copy_(state[name])


# --------------------------------------------------------------------------------------------
# LoRA checkpoints: adapters + a hashed reference to the base


@dataclass(frozen=True)
class BaseRef:
    """The base checkpoint a LoRA checkpoint's adapters belong to."""

    checkpoint: Path  # the resolved checkpoint directory, absolute
    sha256: str  # of its model.safetensors

    def to_json(self) -> dict[str, str]:
        return {"checkpoint": str(self.checkpoint), "sha256": self.sha256}


def base_reference(path: str | os.PathLike) -> BaseRef:
    """Resolve a base checkpoint (a checkpoint or run directory) and hash its weights."""
    from lmforge.checkpoint import WEIGHTS_FILE, resolve_checkpoint
    from lmforge.hashing import file_sha256

    directory = resolve_checkpoint(path).resolve()
    if is_lora_checkpoint(directory):
        raise UserError(f"{directory} is a LoRA checkpoint; merge it first "
                        "(lmforge lora merge) to use it as a base")
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise UserError(f"base checkpoint {directory} has no {WEIGHTS_FILE}")
    return BaseRef(directory, file_sha256(weights))


def is_lora_checkpoint(directory: str | os.PathLike) -> bool:
    return (Path(directory) / LORA_META).is_file()


def write_lora_files(model: nn.Module, cfg: RunConfig, directory: str | os.PathLike, base: BaseRef,
                     tokenizer_dir: str | os.PathLike | None = None) -> None:
    """The LoRA counterpart of checkpoint.write_model_files: adapters, base reference, config and
    tokenizer into an existing directory (a training loop calls it inside its atomic one)."""
    from safetensors.torch import save_file

    from lmforge.checkpoint import write_config_files

    directory = Path(directory)
    state = {name: t.contiguous().cpu() for name, t in adapter_state(model).items()}
    save_file(state, str(directory / LORA_WEIGHTS), metadata={"format": "pt"})
    atomic_write_json(directory / LORA_META, {"format": LORA_FORMAT, "version": LORA_VERSION,
                                              "base": base.to_json()})
    write_config_files(cfg, directory, tokenizer_dir)


def save_lora_checkpoint(model: nn.Module, cfg: RunConfig, directory: str | os.PathLike, base: BaseRef,
                         tokenizer_dir: str | os.PathLike | None = None, overwrite: bool = False) -> Path:
    """Write a LoRA checkpoint directory atomically: it appears complete or not at all."""
    directory = Path(directory)
    if directory.exists() and not overwrite:
        raise UserError(f"{directory} already exists; choose a new directory or pass --force")
    with atomic_directory(directory, overwrite=overwrite) as tmp:
        write_lora_files(model, cfg, tmp, base, tokenizer_dir)
    return directory


def read_lora_meta(directory: str | os.PathLike) -> BaseRef:
    """The base reference of a LoRA checkpoint directory, checked for format and version."""
    file = Path(directory) / LORA_META
    try:
        meta: Any = json.loads(file.read_text(encoding="utf-8"))
        if meta.get("format") != LORA_FORMAT:
            raise UserError(f"{file}: not a LoRA checkpoint file (expected \"format\": \"{LORA_FORMAT}\")")
        if meta.get("version") != LORA_VERSION:
            raise UserError(f"{file}: LoRA version {meta.get('version')!r} is not supported "
                            f"(this lmforge reads {LORA_VERSION})")
        return BaseRef(Path(meta["base"]["checkpoint"]), str(meta["base"]["sha256"]))
    except (OSError, ValueError, AttributeError, KeyError, TypeError) as e:
        raise UserError(f"{file}: not a readable LoRA checkpoint file ({type(e).__name__}: {e})") from None


def load_lora_model(path: str | os.PathLike, device: torch.device | str = "cpu",
                    merged: bool = True) -> Transformer:
    """A LoRA checkpoint's base with its adapters applied, in eval mode.

    The base must be the very checkpoint the adapters were trained on (same sha256 of its
    weights). `merged` (what `lmforge.load_model` returns): a plain Transformer with the adapters
    folded in; otherwise the adapted model, base frozen and adapters trainable (to resume)."""
    from lmforge.checkpoint import (
        WEIGHTS_FILE,
        build_model,
        load_state,
        read_config,
        resolve_checkpoint,
    )
    from lmforge.hashing import file_sha256

    directory = resolve_checkpoint(path)
    base = read_lora_meta(directory)
    cfg = read_config(directory)
    weights = base.checkpoint / WEIGHTS_FILE
    if not weights.is_file():
        raise UserError(f"base checkpoint {base.checkpoint} of {directory} not found "
                        f"(recorded in {directory / LORA_META})")
    if file_sha256(weights) != base.sha256:
        raise UserError(f"base checkpoint {base.checkpoint} changed since the adapters in {directory} "
                        f"were trained (sha256 of {WEIGHTS_FILE} differs from {directory / LORA_META})")
    base_cfg = read_config(base.checkpoint)
    if base_cfg.model != cfg.model:
        raise UserError(f"{directory}: its model config differs from its base {base.checkpoint}'s")
    model = build_model(cfg, load_state(weights), str(weights))
    apply_lora(model, cfg.lora)
    load_adapters(model, load_state(directory / LORA_WEIGHTS), str(directory / LORA_WEIGHTS))
    if merged:
        merge_lora(model)
    return model.to(device).eval()


# --------------------------------------------------------------------------------------------
# CLI: lmforge lora merge


def merge_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, metavar="DIR",
                        help="LoRA checkpoint directory (or a run directory: its newest complete checkpoint)")
    parser.add_argument("--out", required=True, metavar="CKPT", help="plain checkpoint directory to write")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")


def merge_command(args: argparse.Namespace) -> int:
    out = merge_checkpoint(args.checkpoint, args.out, overwrite=args.force)
    print(f"wrote {out}: base + adapters merged into a plain checkpoint")
    return 0


MERGE_RECORD = "merged_from.json"


def merge_checkpoint(checkpoint: str | os.PathLike, out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write a plain checkpoint of a LoRA checkpoint's base with its adapters merged in, plus
    `merged_from.json` naming the adapters and the base (with its hash)."""
    from lmforge.checkpoint import TOKENIZER_DIR, read_config, resolve_checkpoint, write_model_files
    from lmforge.hashing import file_sha256

    directory = resolve_checkpoint(checkpoint)
    if not is_lora_checkpoint(directory):
        raise UserError(f"{directory} is not a LoRA checkpoint (it has no {LORA_META}); nothing to merge")
    out = Path(out)
    if out.exists() and not overwrite:
        raise UserError(f"{out} already exists; choose a new directory or pass --force")
    model = load_lora_model(directory)
    tokenizer = directory / TOKENIZER_DIR
    record = {"adapters": str(directory.resolve()), "adapters_sha256": file_sha256(directory / LORA_WEIGHTS),
              "base": read_lora_meta(directory).to_json()}
    with atomic_directory(out, overwrite=overwrite) as tmp:
        write_model_files(model, read_config(directory), tmp, tokenizer if tokenizer.is_dir() else None)
        atomic_write_json(tmp / MERGE_RECORD, record)
    return out
