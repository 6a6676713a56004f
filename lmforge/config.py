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

from lmforge.errors import ConfigError

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
]


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
    """

    vocab_size: int = 4096
    pattern: str = GPT4_SPLIT_PATTERN
    special_tokens: list[str] = field(default_factory=lambda: list(DEFAULT_SPECIAL_TOKENS))

    def validate(self) -> None:
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
class DataConfig:
    """Data preparation: sources -> filters -> dedup -> split -> token shards.

    sources: inputs: files, directories, globs, `*.jsonl`, `*.parquet`, `*.gz`, or `builtin:default`.
    text_field: the field holding the text in JSONL and Parquet records.
    val_fraction: share of documents (chosen by content hash) held out for validation.
    shard_tokens: tokens per shard file.
    workers: processes used for filtering and tokenization.
    """

    sources: list[str] = field(default_factory=lambda: ["builtin:default"])
    text_field: str = "text"
    val_fraction: float = 0.01
    shard_tokens: int = 1 << 22
    workers: int = 2

    def validate(self) -> None:
        if not self.sources:
            raise ConfigError("data.sources is empty: name at least one file, directory or builtin:default")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction={self.val_fraction} must be in [0, 1)")
        _positive("data.shard_tokens", self.shard_tokens)
        _positive("data.workers", self.workers)


@dataclass
class TrainConfig:
    """Pre-training loop.

    max_steps: optimizer steps to run.
    batch_size: sequences per micro-batch on each device.
    seq_len: tokens per sequence; 0 means model.max_seq_len.
    lr: peak learning rate; warmup_steps of linear warmup, then `schedule` down to lr * min_lr_ratio.
    checkpoint_every / eval_every: steps between checkpoints / validation evaluations.
    seed: seeds data order, initialisation and sampling.
    """

    max_steps: int = 1000
    batch_size: int = 16
    seq_len: int = 0
    lr: float = 3e-3
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1
    schedule: str = "cosine"
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    checkpoint_every: int = 200
    eval_every: int = 100
    seed: int = 1337

    def validate(self) -> None:
        for name in ("max_steps", "batch_size", "checkpoint_every", "eval_every"):
            _positive(f"train.{name}", getattr(self, name))
        _non_negative("train.seq_len", self.seq_len)
        _non_negative("train.warmup_steps", self.warmup_steps)
        _positive("train.lr", self.lr)
        _choice("train.schedule", self.schedule, ("cosine", "wsd", "constant"))


@dataclass
class DebugConfig:
    """Debug switches.

    inject: faults to inject, e.g. "spike@40,nan@70" (a loss spike at step 40, a NaN at step 70).
    """

    inject: str = ""


@dataclass
class RunConfig:
    """Everything one run needs, grouped by lifecycle stage."""

    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)

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
        "train": dict(batch_size=16, lr=3e-3, warmup_steps=50),
    },
    # ~23M parameters: a laptop run of an hour, or minutes on a GPU.
    "small": {
        "model": dict(vocab_size=8192, d_model=512, n_layers=6, n_heads=8, n_kv_heads=4, max_seq_len=512),
        "tokenizer": dict(vocab_size=8192),
        "train": dict(batch_size=16, lr=1.5e-3, warmup_steps=200),
    },
    # GPT-2 small shape (124M with tied embeddings), padded vocab 50304 for fast matmuls.
    "gpt2-124m": {
        "model": dict(vocab_size=50304, d_model=768, n_layers=12, n_heads=12, n_kv_heads=12,
                      d_ff=3072, max_seq_len=1024),
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
        if isinstance(value, (int, float)) and not isinstance(value, bool):
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
# Small validators with uniform messages.


def _positive(name: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(f"{name}={value} must be > 0")


def _non_negative(name: str, value: float) -> None:
    if value < 0:
        raise ConfigError(f"{name}={value} must be >= 0")


def _choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name}={value!r} must be one of: {', '.join(choices)}")
