"""Parameters, FLOPs and memory of a model, computed from its ModelConfig alone.

Pure arithmetic (no model is built), so a 7B plan is instant. Later stages (planning, parallelism)
use the same functions. Conventions, with d = d_model, L = n_layers, H / K = query / key-value
heads of size h, F = MLP width, V = vocabulary, T = sequence length:

FLOPs per token (PaLM, Chowdhery et al. 2022, appendix B; Chinchilla counts the same way):
    forward  = 2 * N_matmul + 4 * L * H * h * T      N_matmul: weights used in matmuls, including
    training = 3 * forward  = 6 * N_matmul + 12 * L * H * h * T     the LM head even when tied
The attention term counts QK^T and AV over the full length T (not halved for causality).

Activation memory (the method of Korthikanti et al. 2022, "Reducing Activation Recomputation":
count every tensor a layer keeps for backward). Per token and layer, in elements, for our block with
a fused (flash-style) attention kernel and no dropout:
    norms       2d          inputs of the two norms (the residual stream); their outputs, the
                            normed inputs of attention and MLP, are made again in backward
    attention   (H + 2K)h + 2Hh + H         q, k, v; output and its reshaped copy;
                                            log-sum-exp per head (+ (H + K)h with QK-norm)
    MLP (llama) 2F          gate, up (silu(gate) and its product with up are made again)
    MLP (gpt2)  2F          up, gelu(up)
What is made again in backward is lmforge/autograd_ops.py's choice in eager mode; under
torch.compile the compiler's partitioner chooses.
plus, per token, the final norm (2d) and what the loss keeps of the logits, by how the head runs
(`loss_head`): "plain" (eager) keeps the fp32 log-softmax (V, always 4 bytes; not the logits);
"compiled" (train.compile: head and cross-entropy one graph) fuses the log-softmax away and keeps
the logits; "fused" (train.fused_loss, a chunk of tokens at a time) keeps neither. Without a fused
attention kernel add 2 * H * T per token and layer (scores and probabilities). Korthikanti's
34 + 5aT/d bytes per element of d is the same count for GPT-3's block with dropout masks.

Measured on an H200 (gpt2-124m, batch 16 x 1024, compiled blocks, bf16): 8.17 GiB peak with the
compiled head (estimate 8.96), 7.52 GiB with the fused loss (estimate 7.42); the "plain" count
(12.03) held for neither, benchmarks/RESULTS.md (measured while blocks also kept their normed
inputs, silu(gate) and the product: 2d + 2F more per layer).
"""

from __future__ import annotations

from dataclasses import dataclass

from lmforge.config import ModelConfig, RunConfig

BYTES = {"fp32": 4, "bf16": 2}


@dataclass(frozen=True)
class ParamCounts:
    embedding: int  # token (and gpt2 position) embeddings
    attention: int  # q, k, v, o projections of all layers
    mlp: int  # MLP projections of all layers
    norms: int  # every norm's weight (and bias)
    head: int  # untied LM head; 0 when tied to the embedding

    @property
    def total(self) -> int:
        return self.embedding + self.attention + self.mlp + self.norms + self.head

    def as_dict(self) -> dict[str, int]:
        return {"embedding": self.embedding, "attention": self.attention, "mlp": self.mlp,
                "norms": self.norms, "head": self.head, "total": self.total}


def _attention_weights(cfg: ModelConfig) -> int:
    """Matmul weights of one layer's attention (biases excluded)."""
    q = cfg.n_heads * cfg.head_dim
    kv = cfg.kv_heads * cfg.head_dim
    return cfg.d_model * q + 2 * cfg.d_model * kv + q * cfg.d_model


def _mlp_weights(cfg: ModelConfig) -> int:
    return (2 if cfg.arch == "gpt2" else 3) * cfg.d_model * cfg.ffn_dim


def param_counts(cfg: ModelConfig) -> ParamCounts:
    """Exact parameter counts by group; they sum to the model's `sum(p.numel())`."""
    d, L = cfg.d_model, cfg.n_layers
    gpt2 = cfg.arch == "gpt2"
    attention = _attention_weights(cfg)
    mlp = _mlp_weights(cfg)
    if gpt2:  # biases on every projection
        attention += (cfg.n_heads + 2 * cfg.kv_heads) * cfg.head_dim + d
        mlp += cfg.ffn_dim + d
    norm = 2 * d if gpt2 else d  # LayerNorm has a bias, RMSNorm does not
    layer_norms = 2 * norm + (2 * cfg.head_dim if cfg.qk_norm else 0)
    embedding = cfg.vocab_size * d + (cfg.max_seq_len * d if gpt2 else 0)
    return ParamCounts(
        embedding=embedding,
        attention=L * attention,
        mlp=L * mlp,
        norms=L * layer_norms + norm,
        head=0 if cfg.tie_embeddings else cfg.vocab_size * d,
    )


def matmul_params(cfg: ModelConfig) -> int:
    """Weights multiplied per token: all layers' projections and the LM head (tied or not)."""
    return cfg.n_layers * (_attention_weights(cfg) + _mlp_weights(cfg)) + cfg.vocab_size * cfg.d_model


def flops_per_token(cfg: ModelConfig, seq_len: int) -> dict[str, float]:
    """Forward and training (forward + backward) FLOPs per token at context length `seq_len`."""
    attention = 4 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len
    forward = 2 * matmul_params(cfg) + attention
    return {"forward": float(forward), "training": float(3 * forward)}


def activation_elements_per_token(cfg: ModelConfig, seq_len: int, fused_attention: bool = True,
                                  logits: bool = True) -> int:
    """Elements kept for backward per token (all layers + final norm + the logits unless
    `logits` is False), see module doc."""
    d, F, h = cfg.d_model, cfg.ffn_dim, cfg.head_dim
    H, K = cfg.n_heads, cfg.kv_heads
    attention = (H + 2 * K) * h + 2 * H * h + H + ((H + K) * h if cfg.qk_norm else 0)
    if not fused_attention:
        attention += 2 * H * seq_len
    mlp = 2 * F  # gpt2: up, gelu(up); llama: gate, up
    return cfg.n_layers * (2 * d + attention + mlp) + 2 * d + (cfg.vocab_size if logits else 0)


LOSS_HEADS = ("plain", "compiled", "fused")


def loss_head(cfg: RunConfig, device_type: str) -> str:
    """How a training run on `device_type` computes its loss head (see the module doc)."""
    if cfg.train.uses_fused_loss(device_type):
        return "fused"
    return "compiled" if cfg.train.compile else "plain"


def memory_bytes(cfg: ModelConfig, batch_size: int, seq_len: int, dtype: str = "fp32",
                 fused_attention: bool = True, head: str = "plain") -> dict[str, int]:
    """Training memory in bytes as lmforge trains: `dtype` ("fp32" or "bf16") is the compute
    dtype of the activations (bf16 under autocast); weights, grads and the two AdamW moments are
    fp32 master copies either way. `head` ("plain", "compiled" or "fused") is how the loss keeps
    the logits (see the module doc); `training_memory` resolves dtype and head from a run config.
    """
    if head not in LOSS_HEADS:
        raise ValueError(f"head={head!r}: one of {LOSS_HEADS}")
    n = param_counts(cfg).total
    tokens = batch_size * seq_len
    elements = activation_elements_per_token(cfg, seq_len, fused_attention, logits=head == "compiled")
    activations = tokens * (elements * BYTES[dtype] + (cfg.vocab_size * 4 if head == "plain" else 0))
    fp32 = BYTES["fp32"]
    out = {"weights": n * fp32, "grads": n * fp32, "adamw": 2 * n * fp32, "activations": activations}
    out["total"] = sum(out.values())
    return out


def memory_mode(cfg: RunConfig, device_type: str) -> str:
    """What `training_memory` assumes on a device, in words: e.g. "bf16 autocast, compiled loss head"."""
    dtype = "bf16 autocast" if cfg.train.uses_bf16(device_type) else "fp32"
    return f"{dtype}, {loss_head(cfg, device_type)} loss head"


def training_memory(cfg: RunConfig, batch_size: int, seq_len: int, device_type: str) -> dict[str, int]:
    """`memory_bytes` of `cfg` trained on `device_type` as the trainer would: its dtype there
    (train.dtype) and its loss head (train.fused_loss, train.compile). `lmforge model info`,
    `lmforge plan` and the run report all print this one estimate, for "cpu" and for "cuda"."""
    dtype = "bf16" if cfg.train.uses_bf16(device_type) else "fp32"
    return memory_bytes(cfg.model, batch_size, seq_len, dtype, head=loss_head(cfg, device_type))


def human(n: float, unit: str = "") -> str:
    """Counts: 1234567 -> '1.23M' (K, M, B, T); unit 'B' (bytes): '1.18 GiB'; unit 'FLOP':
    '50.07 MFLOP'."""
    if unit == "B":
        steps = (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10))
    elif unit:
        steps = ((f"T{unit}", 1e12), (f"G{unit}", 1e9), (f"M{unit}", 1e6), (f"K{unit}", 1e3))
    else:
        steps = (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3))
    sep = " " if unit else ""
    for suffix, scale in steps:
        if abs(n) >= scale:
            return f"{n / scale:.2f}{sep}{suffix}"
    return f"{n:.0f}{sep}{unit}"
