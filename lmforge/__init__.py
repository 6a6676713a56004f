"""lmforge: build a large language model from scratch, every stage readable and owned.

The small public API:

    lmforge.load_config(preset=..., config_file=..., overrides=[...])  -> RunConfig
    lmforge.load_model(dir)        -> Transformer in eval mode (safetensors weights, never pickle)
    lmforge.load_tokenizer(dir)    -> Tokenizer
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lmforge.config import RunConfig, load_config
from lmforge.errors import ConfigError, UserError

__version__ = "0.1.0"

if TYPE_CHECKING:  # pragma: no cover
    from lmforge.model import Transformer
    from lmforge.tokenizer import Tokenizer


def load_model(path: Any, device: str = "cpu") -> Transformer:
    """Load a checkpoint directory (or a run directory: its newest complete checkpoint)."""
    from lmforge.checkpoint import load_model as _load

    return _load(path, device=device)


def load_tokenizer(path: Any) -> Tokenizer:
    """Load a tokenizer directory written by `lmforge tokenizer train`."""
    from lmforge.tokenizer import load_tokenizer as _load

    return _load(path)


__all__ = ["ConfigError", "RunConfig", "UserError", "load_config", "load_model", "load_tokenizer"]
