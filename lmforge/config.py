"""The one configuration mechanism: typed dataclasses, TOML files, `--set` overrides, presets.

A run is described by one `RunConfig` made of sections (`model`, `tokenizer`, `data`, `train`, ...).
It is resolved in layers, each overriding the last:

    defaults  ->  preset (--preset NAME)  ->  TOML file (--config F.toml)  ->  --set section.field=value

and then validated; every problem is a `ConfigError` naming the field, e.g.
`model.n_heads=6 must divide model.d_model=100`. Each section's fields carry their meaning in the
docstring of the class, so `lmforge config show` output and this file are the documentation.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

from lmforge.align.config import DpoConfig, GrpoConfig, RewardConfig
from lmforge.errors import ConfigError
from lmforge.finetune.config import SftConfig
from lmforge.pipeline.config import LifecycleConfig

# The GPT-4 (cl100k) style pre-split: contractions, words with a leading non-letter, numbers of at
# most three digits, punctuation runs, and whitespace handled so that spaces attach to the next word.
GPT4_SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
)

DEFAULT_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|pad|>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|end|>",
    "<|tool|>",  # reserved: a tool call (calculator) opens ...
    "<|/tool|>",  # ... and closes; see lmforge/chat/format.py
]

# The digit rule inside GPT4_SPLIT_PATTERN; `tokenizer.digits` rewrites its upper bound.
DIGIT_RUN = r"\p{N}{1,3}"


@dataclass
class ModelConfig:
    """Shape of the decoder-only transformer.

    arch: "llama" (RMSNorm, RoPE, SwiGLU) or "gpt2" (LayerNorm, learned positions, GELU MLP) baseline.
    vocab_size: rows of the embedding table (>= the tokenizer's vocabulary).
    d_model: width of the residual stream.
    n_layers: number of transformer blocks.
    n_heads: query heads; head_dim = d_model / n_heads.
    n_kv_heads: key/value heads (n_heads: MHA, 1: MQA, in between: GQA); 0 means n_heads.
    d_ff: hidden width of the MLP; 0 picks 8/3 * d_model rounded up to a multiple of 64 (SwiGLU)
        or 4 * d_model (gpt2).
    max_seq_len: longest context the model is built for (RoPE tables, KV cache, positions).
    rope_theta: base of the rotary position frequencies.
    qk_norm: RMSNorm on queries and keys per head (Qwen3 style).
    tie_embeddings: share the token embedding and the LM head.
    norm_eps: epsilon of the normalisation layers.
    init_std: standard deviation of the normal initialisation.
    scale_residual_init: scale residual output projections by 1/sqrt(2 * n_layers) at init.
    """

    arch: str = "llama"
    vocab_size: int = 4096
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 0
    d_ff: int = 0
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    qk_norm: bool = False
    tie_embeddings: bool = True
    norm_eps: float = 1e-5
    init_std: float = 0.02
    scale_residual_init: bool = True

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def ffn_dim(self) -> int:
        if self.d_ff:
            return self.d_ff
        if self.arch == "gpt2":
            return 4 * self.d_model
        return 64 * math.ceil(8 * self.d_model / 3 / 64)

    def validate(self) -> None:
        _choice("model.arch", self.arch, ("llama", "gpt2"))
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len"):
            _positive(f"model.{name}", getattr(self, name))
        _non_negative("model.n_kv_heads", self.n_kv_heads)
        _non_negative("model.d_ff", self.d_ff)
        if self.d_model % self.n_heads:
            raise ConfigError(
                f"model.n_heads={self.n_heads} must divide model.d_model={self.d_model}"
            )
        if self.n_heads % self.kv_heads:
            raise ConfigError(
                f"model.n_kv_heads={self.n_kv_heads} must divide model.n_heads={self.n_heads}"
            )
        if self.arch == "llama" and self.head_dim % 2:
            raise ConfigError(
                f"rotary embeddings need an even head size, but model.d_model={self.d_model} / "
                f"model.n_heads={self.n_heads} = {self.head_dim}"
            )
        _positive("model.rope_theta", self.rope_theta)
        _positive("model.norm_eps", self.norm_eps)
        _positive("model.init_std", self.init_std)


@dataclass
class TokenizerConfig:
    """Byte-level BPE tokenizer training.

    vocab_size: target vocabulary, 256 byte tokens + merges + special tokens.
    pattern: regex that pre-splits text into chunks; merges never cross chunk boundaries.
    special_tokens: strings that are never split or merged; their ids follow the merges in order.
    digits: longest run of digits kept in one chunk: 3 (GPT-4's groups, e.g. "2024" -> "202" "4")
        or 1 (one digit per token: every number is spelled digit by digit, as arithmetic needs).
        It rewrites the digit rule (`DIGIT_RUN`) of `pattern`, see `split_pattern`.
    """

    vocab_size: int = 4096
    pattern: str = GPT4_SPLIT_PATTERN
    special_tokens: list[str] = field(default_factory=lambda: list(DEFAULT_SPECIAL_TOKENS))
    digits: int = 3

    @property
    def split_pattern(self) -> str:
        """`pattern` with digit runs capped at `digits` (the regex the tokenizer is trained with)."""
        if self.digits == 3:
            return self.pattern
        return self.pattern.replace(DIGIT_RUN, DIGIT_RUN.replace("3", str(self.digits)))

    def validate(self) -> None:
        _positive("tokenizer.digits", self.digits)
        if self.digits != 3 and DIGIT_RUN not in self.pattern:
            raise ConfigError(f"tokenizer.digits={self.digits} needs tokenizer.pattern to contain "
                              f"{DIGIT_RUN} (the digit rule it rewrites)")
        if len(set(self.special_tokens)) != len(self.special_tokens):
            dupes = sorted({t for t in self.special_tokens if self.special_tokens.count(t) > 1})
            raise ConfigError(f"tokenizer.special_tokens has duplicates: {dupes}")
        if any(not t for t in self.special_tokens):
            raise ConfigError("tokenizer.special_tokens must not contain an empty string")
        floor = 256 + len(self.special_tokens)
        if self.vocab_size < floor:
            raise ConfigError(
                f"tokenizer.vocab_size={self.vocab_size} is below 256 byte tokens + "
                f"{len(self.special_tokens)} special tokens = {floor}"
            )


@dataclass
class FilterConfig:
    """Heuristic quality filters in the style of Gopher (Rae et al. 2021) and C4; a document is
    removed by the first rule it fails. Prose rules apply to text, the `code_*` rules to code.

    enabled: apply the quality filters at all.
    min_words / max_words: bounds on the number of whitespace-separated words.
    min_mean_word_length / max_mean_word_length: bounds on the mean word length in characters.
    max_symbol_word_ratio: most `#` and ellipsis symbols per word.
    min_alpha_word_fraction: least share of words containing an alphabetic character.
    max_bullet_line_fraction: most share of lines starting with a bullet.
    max_ellipsis_line_fraction: most share of lines ending with an ellipsis.
    max_duplicate_line_fraction / max_duplicate_paragraph_fraction: most share of lines / paragraphs
        that repeat an earlier one.
    max_top_ngram_fraction: for n = 2, 3, 4, most share of word characters taken by the most
        frequent n-gram.
    max_duplicate_ngram_fraction: for n = 5, 6, ..., most share of word characters inside n-grams
        that occur more than once (one threshold per n).
    code_min_chars: shortest code file kept, in characters.
    code_max_line_length: longest line allowed in code.
    code_max_mean_line_length: most mean line length in code.
    code_min_alnum_fraction: least share of alphanumeric characters in code.
    examples: removed documents remembered per rule for the report.
    """

    enabled: bool = True
    min_words: int = 50
    max_words: int = 100_000
    min_mean_word_length: float = 3.0
    max_mean_word_length: float = 10.0
    max_symbol_word_ratio: float = 0.1
    min_alpha_word_fraction: float = 0.8
    max_bullet_line_fraction: float = 0.9
    max_ellipsis_line_fraction: float = 0.3
    max_duplicate_line_fraction: float = 0.3
    max_duplicate_paragraph_fraction: float = 0.3
    max_top_ngram_fraction: list[float] = field(default_factory=lambda: [0.20, 0.18, 0.16])
    max_duplicate_ngram_fraction: list[float] = field(
        default_factory=lambda: [0.15, 0.14, 0.13, 0.12, 0.11, 0.10]
    )
    code_min_chars: int = 100
    code_max_line_length: int = 1000
    code_max_mean_line_length: float = 100.0
    code_min_alnum_fraction: float = 0.25
    examples: int = 3

    def validate(self) -> None:
        p = "data.filters"
        _positive(f"{p}.max_words", self.max_words)
        _non_negative(f"{p}.min_words", self.min_words)
        if self.min_words > self.max_words:
            raise ConfigError(f"{p}.min_words={self.min_words} exceeds {p}.max_words={self.max_words}")
        if self.min_mean_word_length > self.max_mean_word_length:
            raise ConfigError(
                f"{p}.min_mean_word_length={self.min_mean_word_length} exceeds "
                f"{p}.max_mean_word_length={self.max_mean_word_length}"
            )
        for name in ("max_symbol_word_ratio", "code_max_mean_line_length"):
            _non_negative(f"{p}.{name}", getattr(self, name))
        for name in ("min_alpha_word_fraction", "max_bullet_line_fraction",
                     "max_ellipsis_line_fraction", "max_duplicate_line_fraction",
                     "max_duplicate_paragraph_fraction", "code_min_alnum_fraction"):
            _fraction(f"{p}.{name}", getattr(self, name))
        for name in ("max_top_ngram_fraction", "max_duplicate_ngram_fraction"):
            for i, v in enumerate(getattr(self, name)):
                _fraction(f"{p}.{name}[{i}]", v)
        if len(self.max_top_ngram_fraction) > 3:
            raise ConfigError(f"{p}.max_top_ngram_fraction has one value per n = 2, 3, 4 (at most 3)")
        _non_negative(f"{p}.code_min_chars", self.code_min_chars)
        _positive(f"{p}.code_max_line_length", self.code_max_line_length)
        _non_negative(f"{p}.examples", self.examples)


@dataclass
class DedupConfig:
    """Deduplication: exact (hash of the normalised text), then near (MinHash + LSH banding).

    exact: drop documents whose normalised text (lower case, whitespace collapsed) repeats.
    near: drop documents whose estimated Jaccard similarity to a kept one is >= threshold.
    num_perm: MinHash permutations (signature length).
    bands: LSH bands; num_perm must be a multiple, each band has num_perm / bands rows.
    threshold: Jaccard similarity of word n-gram sets from which two documents are duplicates.
    ngram: words per shingle.
    seed: seed of the permutations (same meaning as datasketch's MinHash seed).
    """

    exact: bool = True
    near: bool = True
    num_perm: int = 128
    bands: int = 16
    threshold: float = 0.8
    ngram: int = 5
    seed: int = 1

    def validate(self) -> None:
        _positive("data.dedup.num_perm", self.num_perm)
        _positive("data.dedup.bands", self.bands)
        _positive("data.dedup.ngram", self.ngram)
        if self.num_perm % self.bands:
            raise ConfigError(
                f"data.dedup.bands={self.bands} must divide data.dedup.num_perm={self.num_perm}"
            )
        if not 0.0 < self.threshold <= 1.0:
            raise ConfigError(f"data.dedup.threshold={self.threshold} must be in (0, 1]")


@dataclass
class DecontamConfig:
    """Decontamination against reference texts (e.g. evaluation sets).

    references: files, directories or globs of reference texts (same forms as data.sources), or
        benchmarks as `eval:TASKS` with TASKS as `lmforge eval --tasks` takes them ("eval:all",
        "eval:core", "eval:gsm8k,humaneval"): every item of those tasks is a reference.
    ngram: words per n-gram; a document sharing any such n-gram with a reference is contaminated.
    action: "drop" removes contaminated documents, "flag" keeps them and lists them in the manifest.
    """

    references: list[str] = field(default_factory=list)
    ngram: int = 13
    action: str = "drop"

    def validate(self) -> None:
        _positive("data.decontam.ngram", self.ngram)
        _choice("data.decontam.action", self.action, ("drop", "flag"))


@dataclass
class DataConfig:
    """Data preparation: sources -> clean -> filters -> dedup -> decontam -> split -> token shards.

    sources: inputs: files, directories, globs, `*.jsonl`, `*.parquet`, `*.gz`, or `builtin:default`.
    text_field: the field holding the text in JSONL and Parquet records.
    val_fraction: share of documents (chosen by content hash) held out for validation.
    val_min_tokens: hold out at least about this many tokens for validation (estimated at
        6 bytes per token before the tokenizer exists, see lmforge/data/prepare.py): train documents with
        the smallest split hash move over, never more than half. `data prepare` and `lmforge run`
        raise it to one evaluation batch of [train] (`RunConfig.eval_batch_tokens`), so a small
        corpus still has a validation split the trainer can evaluate on.
    shard_tokens: tokens per shard file.
    workers: processes for cleaning and filtering, threads for tokenization.
    strict: malformed input (a bad JSONL line, bytes that are not UTF-8) is an error, not a warning.
    unicode_form: Unicode normalisation applied by cleaning: "NFC", "NFKC" or "none".
    builtin_code_max_bytes: cap on the Python standard library sources in `builtin:default`.
    filters: quality filters (section data.filters).
    dedup: deduplication (section data.dedup).
    decontam: decontamination (section data.decontam).
    """

    sources: list[str] = field(default_factory=lambda: ["builtin:default"])
    text_field: str = "text"
    val_fraction: float = 0.01
    val_min_tokens: int = 0
    shard_tokens: int = 1 << 22
    workers: int = 2
    strict: bool = False
    unicode_form: str = "NFC"
    builtin_code_max_bytes: int = 4_000_000
    filters: FilterConfig = field(default_factory=FilterConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    decontam: DecontamConfig = field(default_factory=DecontamConfig)

    def validate(self) -> None:
        if not self.sources:
            raise ConfigError("data.sources is empty: name at least one file, directory or builtin:default")
        if not self.text_field:
            raise ConfigError("data.text_field must not be empty")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction={self.val_fraction} must be in [0, 1)")
        _non_negative("data.val_min_tokens", self.val_min_tokens)
        _positive("data.shard_tokens", self.shard_tokens)
        _positive("data.workers", self.workers)
        _choice("data.unicode_form", self.unicode_form, ("NFC", "NFKC", "none"))
        _non_negative("data.builtin_code_max_bytes", self.builtin_code_max_bytes)
        self.filters.validate()
        self.dedup.validate()
        self.decontam.validate()


@dataclass
class TrainConfig:
    """Pre-training loop.

    max_steps: optimizer steps to run.
    batch_size: sequences per micro-batch on each device.
    batch_tokens: tokens per optimizer step over all devices; gradients are accumulated over
        batch_tokens / (batch_size * seq_len * world_size) micro-batches. 0 means one micro-batch.
    seq_len: tokens per sequence; 0 means model.max_seq_len.
    lr: peak learning rate; warmup_steps of linear warmup, then `schedule` down to lr * min_lr_ratio.
    warmup_steps: steps of linear warmup from ~0 to lr.
    min_lr_ratio: the final learning rate as a share of lr.
    schedule: "cosine" (cosine decay to the end), "wsd" (warmup-stable-decay: constant, then a
        linear decay over the last decay_fraction of the steps) or "constant".
    decay_fraction: share of max_steps used by the final decay of the "wsd" schedule.
    optimizer: "adamw" for every weight, or "muon" (Muon for the 2D matrices inside the blocks,
        AdamW for embeddings, the output head, norms and biases).
    beta1 / beta2 / eps: AdamW moment coefficients and denominator epsilon.
    weight_decay: decoupled weight decay on matrix weights (never on norms, biases, embeddings).
    muon_lr: peak learning rate of the Muon parameters (scaled by the same schedule).
    muon_momentum: Muon's Nesterov momentum.
    grad_clip: clip the global gradient norm to this value; 0 disables clipping.
    checkpoint_every / eval_every: steps between checkpoints / validation evaluations.
    keep_last: complete checkpoints kept besides the best one by validation loss.
    checkpoint_format: "full" (rank 0 gathers the whole model and optimizer state and writes one
        file each) or "sharded" (every rank writes its own shards with torch.distributed.checkpoint,
        so no rank ever holds the whole state: for "fsdp" / "fsdp+tp" models too big to gather; rank 0
        still joins the weights alone into model.safetensors). Either resumes on any number of
        processes. Not with "pipeline", whose stages are separate modules.
    eval_batches: micro-batches of the validation split per evaluation (the same ones each time).
    eval_tasks: benchmark tasks of `lmforge eval` (e.g. ["arc_easy", "hellaswag"], or "core")
        also run at every evaluation, each on its first eval_limit items, zero-shot, logged as
        eval/<task>/<metric> beside val_loss (lmforge/eval/training.py). Default: none.
    eval_limit: items per task of those evaluations.
    sample_every: steps between sample generations written to the log; 0 disables.
    sample_prompt: the prompt of those samples.
    sample_tokens: tokens generated per sample.
    log_every: steps between metric lines in metrics.jsonl.
    seed: seeds data order, initialisation and sampling.
    device: "auto" (CUDA if available, else CPU), "cpu" or "cuda".
    dtype: "auto" (bf16 autocast on GPU, fp32 on CPU), "bf16" or "fp32".
    compile: torch.compile each transformer block and the final norm + head + loss (model.head_loss,
        compiled and held by the pre-training objective; not with the fused loss, which already does
        that head's work in one pass).
    fused_loss: "auto" (on for CPU runs, where it was measured: ~20% faster steps with a 4k
        vocabulary), "on" or "off": the LM head and cross-entropy computed a chunk of tokens at a
        time with their gradients, never holding the (tokens, vocab) logits (model.fused_head_loss).
    activation_checkpointing: recompute each block's activations in the backward pass.
    tf32: on CUDA, let fp32 matrix products (those outside bf16 autocast, or all of them with
        dtype "fp32") use TensorFloat-32 tensor cores: fp32 range and accumulation, 10-bit
        mantissa inputs, several times faster on Ampere and later GPUs. No effect on CPU.
    tensorboard: also write TensorBoard events to RUN_DIR/tb.
    time_budget: wall-clock budget such as "15m" or "2h"; max_steps is then sized from the
        throughput measured in the first steps and re-estimated as the run goes, without LR jumps
        ("" means no budget).
    parallel: parallelism strategy over the processes torchrun starts: "none" (one process; with
        several it means "ddp"), "ddp" (a replica per rank), "fsdp" (parameters, gradients and
        optimizer state sharded, FSDP2), "pipeline" (layers split into one stage per rank) or
        "fsdp+tp" (tensor parallel inside groups of tp_size ranks, FSDP across them).
    pipeline_schedule: "gpipe" (all forwards, then all backwards) or "1f1b" (one forward, one
        backward: fewer micro-batches' activations alive at once).
    pipeline_microbatches: micro-batches each batch is cut into for the pipeline; must divide
        batch_size. More micro-batches shrink the pipeline bubble.
    pipeline_stages: stages of "pipeline"; 0 means one per process. Fewer stages than processes
        replicate the pipeline (world size / stages replicas, data parallel with DDP).
    tp_size: tensor-parallel degree of "fsdp+tp"; must divide the world size, model.n_heads and
        the key/value heads.
    dist_backend: "auto" (NCCL on GPUs, gloo on CPUs), "nccl" or "gloo".
    dist_timeout_s: seconds a collective may wait for the other ranks before the job fails.
    """

    max_steps: int = 1000
    batch_size: int = 16
    batch_tokens: int = 0
    seq_len: int = 0
    lr: float = 3e-3
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1
    schedule: str = "cosine"
    decay_fraction: float = 0.2
    optimizer: str = "adamw"
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    muon_lr: float = 0.02
    muon_momentum: float = 0.95
    grad_clip: float = 1.0
    checkpoint_every: int = 200
    eval_every: int = 100
    keep_last: int = 3
    checkpoint_format: str = "full"
    eval_batches: int = 20
    eval_tasks: list[str] = field(default_factory=list)
    eval_limit: int = 100
    sample_every: int = 0
    sample_prompt: str = "The"
    sample_tokens: int = 48
    log_every: int = 1
    seed: int = 1337
    device: str = "auto"
    dtype: str = "auto"
    compile: bool = False
    fused_loss: str = "auto"
    activation_checkpointing: bool = False
    tf32: bool = True
    tensorboard: bool = True
    time_budget: str = ""
    parallel: str = "none"
    pipeline_schedule: str = "1f1b"
    pipeline_microbatches: int = 4
    pipeline_stages: int = 0
    tp_size: int = 2
    dist_backend: str = "auto"
    dist_timeout_s: float = 600.0

    def uses_bf16(self, device_type: str) -> bool:
        """`dtype` resolved for a device: bf16 compute (autocast, and FSDP's bf16 parameters)
        when asked, or by default on GPUs; fp32 otherwise."""
        return self.dtype == "bf16" or (self.dtype == "auto" and device_type == "cuda")

    def uses_fused_loss(self, device_type: str) -> bool:
        """`fused_loss` resolved for a device: "auto" means on for CPU, where it was measured to
        pay (on an H200 it made a gpt2-124m step 17% slower, benchmarks/RESULTS.md)."""
        return self.fused_loss == "on" or (self.fused_loss == "auto" and device_type == "cpu")

    def validate(self) -> None:
        for name in ("max_steps", "batch_size", "checkpoint_every", "eval_every", "keep_last",
                     "eval_batches", "eval_limit", "log_every", "sample_tokens"):
            _positive(f"train.{name}", getattr(self, name))
        for name in ("seq_len", "warmup_steps", "batch_tokens", "sample_every", "grad_clip",
                     "weight_decay"):
            _non_negative(f"train.{name}", getattr(self, name))
        for name in ("lr", "muon_lr", "eps"):
            _positive(f"train.{name}", getattr(self, name))
        for name in ("beta1", "beta2", "muon_momentum"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"train.{name}={getattr(self, name)} must be in [0, 1)")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"train.min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")
        if not 0.0 < self.decay_fraction <= 1.0:
            raise ConfigError(f"train.decay_fraction={self.decay_fraction} must be in (0, 1]")
        _choice("train.schedule", self.schedule, ("cosine", "wsd", "constant"))
        _choice("train.optimizer", self.optimizer, ("adamw", "muon"))
        _choice("train.device", self.device, ("auto", "cpu", "cuda"))
        _choice("train.dtype", self.dtype, ("auto", "bf16", "fp32"))
        _choice("train.fused_loss", self.fused_loss, ("auto", "on", "off"))
        _choice("train.parallel", self.parallel, ("none", "ddp", "fsdp", "pipeline", "fsdp+tp"))
        _choice("train.pipeline_schedule", self.pipeline_schedule, ("gpipe", "1f1b"))
        _choice("train.checkpoint_format", self.checkpoint_format, ("full", "sharded"))
        if self.checkpoint_format == "sharded" and self.parallel == "pipeline":
            raise ConfigError("train.checkpoint_format='sharded' does not support train.parallel='pipeline'; "
                              "use 'full'")
        _choice("train.dist_backend", self.dist_backend, ("auto", "nccl", "gloo"))
        for name in ("pipeline_microbatches", "tp_size", "dist_timeout_s"):
            _positive(f"train.{name}", getattr(self, name))
        _non_negative("train.pipeline_stages", self.pipeline_stages)
        if self.parallel == "pipeline" and self.batch_size % self.pipeline_microbatches:
            raise ConfigError(
                f"train.pipeline_microbatches={self.pipeline_microbatches} must divide "
                f"train.batch_size={self.batch_size}"
            )
        if self.time_budget:
            parse_duration(self.time_budget, "train.time_budget")


@dataclass
class GuardConfig:
    """Loss-spike and NaN guard of the pre-training loop.

    enabled: watch every step; off means a non-finite step is still never applied but stops the run.
    window: recent clean losses forming the running median and MAD (median absolute deviation).
    threshold: a loss above median + threshold * 1.4826 * MAD (a robust standard deviation,
        floored at min_rel_spread * median and at min_abs_spread) is a spike.
    min_rel_spread: floor of that robust spread as a share of the median, so a flat loss curve
        does not turn noise into spikes.
    min_abs_spread: floor of the spread in nats, so a loss near zero (a memorised batch) does not
        call a rise of a few tenths of a nat a spike.
    max_rollbacks: rollbacks allowed in one run; one more stops the run with an error.
    skip_batches: optimizer steps' worth of data skipped at the offending step after a rollback.
    lr_factor: learning-rate multiplier applied after a rollback (1.0 keeps the schedule).
    lr_cooldown_steps: steps the lowered learning rate lasts.
    """

    enabled: bool = True
    window: int = 50
    threshold: float = 6.0
    min_rel_spread: float = 0.02
    min_abs_spread: float = 0.05
    max_rollbacks: int = 5
    skip_batches: int = 1
    lr_factor: float = 0.5
    lr_cooldown_steps: int = 100

    def validate(self) -> None:
        for name in ("window", "threshold", "skip_batches"):
            _positive(f"guard.{name}", getattr(self, name))
        for name in ("min_rel_spread", "min_abs_spread", "max_rollbacks", "lr_cooldown_steps"):
            _non_negative(f"guard.{name}", getattr(self, name))
        if not 0.0 < self.lr_factor <= 1.0:
            raise ConfigError(f"guard.lr_factor={self.lr_factor} must be in (0, 1]")


@dataclass
class DebugConfig:
    """Debug switches.

    inject: faults to inject, comma separated KIND@STEP, each fired the first time STEP runs:
        spike (loss and gradients x1000), nan (loss and gradients NaN), sigterm (the process
        signals itself: finish the step, checkpoint, exit), sigkill (dies at once),
        sigkill_in_checkpoint (dies in the middle of writing the checkpoint of STEP).
        E.g. "spike@40,nan@70".
    """

    inject: str = ""

    def validate(self) -> None:
        if self.inject:
            parse_inject(self.inject)


LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


@dataclass
class LoraConfig:
    """Low-rank adapters for fine-tuning (lmforge/finetune/lora.py): each targeted linear layer
    computes W x + (alpha / rank) B A x with W frozen and only A (rank x in) and B (out x rank)
    trained; B starts at zero, so training starts from the base model exactly.

    rank: rank r of the adapters; 0 means full fine-tuning (no adapters, every parameter trains).
    alpha: scale numerator; the adapters' output is multiplied by alpha / rank.
    dropout: dropout on the adapters' input while training (the frozen path sees no dropout).
    targets: the linear layers that get adapters, among q, k, v, o (attention projections) and
        gate, up, down (MLP projections; the gpt2 arch has no gate).
    train_embeddings: the token (and position) embeddings train in full beside the adapters.
    train_head: the LM head trains in full beside the adapters; with tied embeddings the head is
        the embedding matrix, so either flag trains that shared matrix.
    """

    rank: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    train_embeddings: bool = False
    train_head: bool = False

    def validate(self) -> None:
        _non_negative("lora.rank", self.rank)
        _positive("lora.alpha", self.alpha)
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout={self.dropout} must be in [0, 1)")
        for target in self.targets:
            _choice("lora.targets", target, LORA_TARGETS)
        if len(set(self.targets)) != len(self.targets):
            raise ConfigError(f"lora.targets={self.targets} names a layer twice")
        if self.rank and not self.targets:
            raise ConfigError(f"lora.targets is empty but lora.rank={self.rank}: name layers among "
                              f"{', '.join(LORA_TARGETS)}, or set lora.rank=0 for full fine-tuning")


@dataclass
class RunConfig:
    """Everything one run needs, grouped by lifecycle stage."""

    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)
    sft: SftConfig = field(default_factory=SftConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    run: LifecycleConfig = field(default_factory=LifecycleConfig)
    grpo: GrpoConfig = field(default_factory=GrpoConfig)
    dpo: DpoConfig = field(default_factory=DpoConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)

    def validate(self) -> RunConfig:
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            if hasattr(section, "validate"):
                section.validate()
        if self.train.seq_len > self.model.max_seq_len:
            raise ConfigError(
                f"train.seq_len={self.train.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}"
            )
        return self

    def eval_batch_tokens(self) -> int:
        """Tokens of validation text one evaluation batch needs (batch_size windows of seq_len + 1)."""
        return self.train.batch_size * (self.train.seq_len or self.model.max_seq_len) + 1

    def hold_out_one_evaluation(self) -> RunConfig:
        """Raise data.val_min_tokens to one evaluation batch (when a validation split is asked for)."""
        if self.data.val_fraction > 0:
            self.data.val_min_tokens = max(self.data.val_min_tokens, self.eval_batch_tokens())
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_toml(self) -> str:
        return to_toml(self.to_dict())

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


# --------------------------------------------------------------------------------------------
# Presets: a name -> the fields it changes from the defaults. Kept as plain data so `config show`
# can print the result and a TOML file can start from any of them.

PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    # ~1.3M parameters: trains on two CPU cores in minutes.
    "tiny": {
        "model": dict(vocab_size=4096, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=256),
        "tokenizer": dict(vocab_size=4096),
        # Tuned for `pretrain --time-budget 10m` on two CPU cores: ~300-600 steps of 2k tokens.
        "train": dict(batch_size=8, lr=3e-3, warmup_steps=30, eval_every=100, eval_batches=10,
                      checkpoint_every=100, sample_every=100),
    },
    # ~23M parameters: a laptop run of an hour, or minutes on a GPU.
    "small": {
        "model": dict(vocab_size=8192, d_model=512, n_layers=6, n_heads=8, n_kv_heads=4, max_seq_len=512),
        "tokenizer": dict(vocab_size=8192),
        "train": dict(batch_size=16, lr=1.5e-3, warmup_steps=200),
    },
    # GPT-2 small shape (124M with tied embeddings), padded vocab 50304 for fast matmuls. d_ff is
    # automatic: 2048 for SwiGLU (same MLP parameters as GPT-2's 4 x 768 = 3072 GELU MLP, which
    # `--set model.arch=gpt2` gets).
    "gpt2-124m": {
        "model": dict(vocab_size=50304, d_model=768, n_layers=12, n_heads=12, n_kv_heads=12,
                      max_seq_len=1024),
        "tokenizer": dict(vocab_size=50257),
        "train": dict(batch_size=16, lr=6e-4, warmup_steps=700),
    },
    # Llama 3.2 1B shape.
    "llama-1b": {
        "model": dict(vocab_size=128256, d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8,
                      d_ff=8192, max_seq_len=2048, rope_theta=500000.0, norm_eps=1e-5),
        "tokenizer": dict(vocab_size=128256),
        "train": dict(batch_size=4, lr=3e-4, warmup_steps=2000),
    },
    # Llama 2 7B shape.
    "llama-7b": {
        "model": dict(vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32,
                      d_ff=11008, max_seq_len=4096, rope_theta=10000.0, tie_embeddings=False,
                      norm_eps=1e-5),
        "tokenizer": dict(vocab_size=32000),
        "train": dict(batch_size=1, lr=3e-4, warmup_steps=2000),
    },
}


def preset_names() -> list[str]:
    return list(PRESETS)


# --------------------------------------------------------------------------------------------
# Resolution: defaults -> preset -> TOML -> --set.


def load_config(
    preset: str | None = None,
    config_file: str | Path | None = None,
    overrides: list[str] | None = None,
    base: dict[str, Any] | None = None,
) -> RunConfig:
    """Resolve a RunConfig from its layers and validate it. Raises ConfigError on any problem.

    `base` is a dict (e.g. the config stored with a checkpoint) applied before the preset.
    """
    cfg = RunConfig()
    if base:
        apply_dict(cfg, base, source="checkpoint config")
    if preset:
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
        apply_dict(cfg, PRESETS[preset], source=f"preset {preset}")
    if config_file:
        apply_dict(cfg, read_toml(config_file), source=str(config_file))
    for item in overrides or []:
        apply_override(cfg, item)
    return cfg.validate()


def config_from_dict(data: dict[str, Any], source: str = "config") -> RunConfig:
    """Rebuild a RunConfig from `to_dict()` output (e.g. a checkpoint's config.json)."""
    cfg = RunConfig()
    apply_dict(cfg, data, source=source)
    return cfg.validate()


def read_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None


def apply_dict(obj: Any, data: dict[str, Any], source: str, prefix: str = "") -> None:
    """Set fields of a (nested) dataclass from a dict, checking names and types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'config'} must be a table")
    names = {f.name: f for f in dataclasses.fields(obj)}
    hints = typing.get_type_hints(type(obj))
    for key, value in data.items():
        path = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(
                f"{source}: unknown config key {path!r}; known keys under "
                f"{prefix.rstrip('.') or 'the top level'}: {', '.join(names)}"
            )
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            apply_dict(current, value, source, prefix=f"{path}.")
        else:
            setattr(obj, key, _coerce(value, hints[key], path, source))


def apply_override(cfg: RunConfig, item: str) -> None:
    """Apply one `section.field=value` override; the value is parsed by the field's type."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected section.field=value")
    path, raw = item.split("=", 1)
    parts = path.strip().split(".")
    obj: Any = cfg
    for i, part in enumerate(parts):
        here = ".".join(parts[: i + 1])
        if not dataclasses.is_dataclass(obj) or part not in {f.name for f in dataclasses.fields(obj)}:
            known = ", ".join(f.name for f in dataclasses.fields(obj)) if dataclasses.is_dataclass(obj) else ""
            raise ConfigError(f"--set: unknown config key {here!r}" + (f"; known: {known}" if known else ""))
        if i == len(parts) - 1:
            if dataclasses.is_dataclass(getattr(obj, part)):
                raise ConfigError(f"--set: {here!r} is a section; name one of its fields")
            hint = typing.get_type_hints(type(obj))[part]
            setattr(obj, part, _coerce(_parse_scalar(raw.strip(), hint), hint, here, "--set"))
        else:
            obj = getattr(obj, part)


def _parse_scalar(raw: str, hint: Any) -> Any:
    """Turn the text of a --set value into a Python value for a field of type `hint`."""
    origin = typing.get_origin(hint)
    if hint is str:
        return raw
    if origin is list:
        if raw.startswith("["):
            try:
                return tomllib.loads(f"v = {raw}")["v"]
            except tomllib.TOMLDecodeError:
                return raw
        return [s.strip() for s in raw.split(",") if s.strip()]
    if hint is bool:
        low = raw.lower()
        if low in ("true", "1", "yes", "on"):
            return True
        if low in ("false", "0", "no", "off"):
            return False
        return raw
    if hint in (int, float):
        try:
            return tomllib.loads(f"v = {raw.replace('_', '')}")["v"]
        except tomllib.TOMLDecodeError:
            return raw
    return raw


def _coerce(value: Any, hint: Any, path: str, source: str) -> Any:
    """Check `value` against the field type; allow int -> float; reject everything else clearly."""
    origin = typing.get_origin(hint)
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif hint is float:
        # nan and inf pass every range check (nan <= 0 is False), so they are refused here, once.
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(f"{source}: {path}={value!r} must be a finite number")
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
    elif origin is list:
        (item_type,) = typing.get_args(hint)
        if isinstance(value, list):
            return [_coerce(v, item_type, f"{path}[{i}]", source) for i, v in enumerate(value)]
    else:  # pragma: no cover - every field uses one of the types above
        return value
    type_name = getattr(hint, "__name__", str(hint))
    raise ConfigError(f"{source}: {path}={value!r} is not a valid {type_name}")


# --------------------------------------------------------------------------------------------
# TOML output (the stdlib reads TOML but does not write it; our values are simple).


def to_toml(data: dict[str, Any]) -> str:
    lines: list[str] = []
    _toml_table(data, "", lines)
    return "\n".join(lines).strip() + "\n"


def _toml_table(data: dict[str, Any], prefix: str, lines: list[str]) -> None:
    scalars = {k: v for k, v in data.items() if not isinstance(v, dict)}
    tables = {k: v for k, v in data.items() if isinstance(v, dict)}
    if prefix and scalars:
        lines.append(f"[{prefix}]")
    for key, value in scalars.items():
        lines.append(f"{key} = {_toml_value(value)}")
    if scalars:
        lines.append("")
    for key, value in tables.items():
        _toml_table(value, f"{prefix}.{key}" if prefix else key, lines)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a JSON string is a valid TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


# --------------------------------------------------------------------------------------------
# Small parsers of values given as text.

INJECT_KINDS = ("spike", "nan", "sigterm", "sigkill", "sigkill_in_checkpoint")


def parse_duration(text: str, name: str = "duration") -> float:
    """"90s", "15m", "1.5h" or a bare number of seconds -> seconds."""
    units = {"s": 1.0, "m": 60.0, "h": 3600.0}
    raw = text.strip().lower()
    scale = units.get(raw[-1:], None)
    number = raw[:-1] if scale else raw
    try:
        seconds = float(number) * (scale or 1.0)
    except ValueError:
        raise ConfigError(f"{name}={text!r} is not a duration like 90s, 15m or 2h") from None
    if not seconds > 0:
        raise ConfigError(f"{name}={text!r} must be a positive duration")
    return seconds


def parse_inject(text: str) -> list[tuple[str, int]]:
    """"spike@40,nan@70" -> [("spike", 40), ("nan", 70)]."""
    faults = []
    for item in filter(None, (p.strip() for p in text.split(","))):
        kind, _, step = item.partition("@")
        if kind not in INJECT_KINDS or not step.isdigit() or int(step) < 1:
            raise ConfigError(
                f"debug.inject: {item!r} is not KIND@STEP with KIND one of {', '.join(INJECT_KINDS)} "
                "and STEP >= 1"
            )
        faults.append((kind, int(step)))
    return faults


# --------------------------------------------------------------------------------------------
# Small validators with uniform messages.


def _positive(name: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(f"{name}={value} must be > 0")


def _non_negative(name: str, value: float) -> None:
    if value < 0:
        raise ConfigError(f"{name}={value} must be >= 0")


def _fraction(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"{name}={value} must be in [0, 1]")


def _choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name}={value!r} must be one of: {', '.join(choices)}")
