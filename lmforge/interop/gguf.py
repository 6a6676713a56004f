"""GGUF export: a checkpoint as one file that llama.cpp (llama-cli, llama-server,
llama-cpp-python, and the tools built on it) loads and chats with.

    lmforge export gguf --checkpoint CKPT --out FILE.gguf [--dtype f32|f16|q8_0]

The file holds, through the `gguf` package (llama.cpp's own writer):
  * the architecture: llama.cpp's `llama` (our default model), or `qwen3` when QK-norm is on, with
    its hyperparameters (context length, widths, head counts, RoPE base, RMSNorm epsilon);
  * the weights under llama.cpp's tensor names. Its `llama` graph rotates interleaved pairs
    (2i, 2i+1) where we (and Hugging Face) rotate halves (i, i + head_dim/2), so the query and key
    rows are permuted within each head; `qwen3` rotates halves, as we do. The 2-D weights are
    stored in `dtype`, the norms always in f32 (as llama.cpp's own converter does);
  * the tokenizer as a `gpt2` (byte-level BPE) model: tokens spelled byte-level, the merges that
    make standard BPE give tiktoken's ids (`merge_pairs`), special tokens as control tokens, and
    the pre-tokenizer llama.cpp knows by name for our split regex (`PRE_TOKENIZERS`);
  * the chat template, so llama.cpp's chat front ends render our chat format.

Only what llama.cpp knows goes in: it refuses a file with tensors its graph does not use.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING

from lmforge.atomic import atomic_file
from lmforge.chat.format import CHAT_TEMPLATE, CHAT_TOKENS, END
from lmforge.config import ModelConfig, TokenizerConfig
from lmforge.errors import UserError
from lmforge.outputs import add_force_arg, check_output

if TYPE_CHECKING:
    import gguf
    import numpy as np
    import torch

    from lmforge.tokenizer import Tokenizer

DTYPES = ("f32", "f16", "q8_0")

# Our split regex -> the name of llama.cpp's pre-tokenizer that applies the same regex. "llama-bpe"
# (Llama 3's, GPT-4's pattern: digits in runs of up to 3) also takes a chunk that is itself a
# token whole, as tiktoken does; "qwen2" is the same pattern with single digits. Theirs are spelled
# a little differently (no possessive quantifiers, `\s*[\r\n]+` for our `\s*[\r\n]`) but cut the
# same chunks: nothing after our possessive items could take what they hold, and a greedy `\s*`
# then newline ends at the run's last newline either way (tests/test_gguf.py checks on real text).
PRE_TOKENIZERS = {
    TokenizerConfig(digits=3).split_pattern: "llama-bpe",
    TokenizerConfig(digits=1).split_pattern: "qwen2",
}

# Our per-layer parameter names -> llama.cpp's (gguf's MODEL_TENSOR names, filled in below).
LAYER_TENSORS = {
    "input_layernorm.weight": "ATTN_NORM",
    "self_attn.q_proj.weight": "ATTN_Q",
    "self_attn.k_proj.weight": "ATTN_K",
    "self_attn.v_proj.weight": "ATTN_V",
    "self_attn.o_proj.weight": "ATTN_OUT",
    "self_attn.q_norm.weight": "ATTN_Q_NORM",
    "self_attn.k_norm.weight": "ATTN_K_NORM",
    "post_attention_layernorm.weight": "FFN_NORM",
    "mlp.gate_proj.weight": "FFN_GATE",
    "mlp.up_proj.weight": "FFN_UP",
    "mlp.down_proj.weight": "FFN_DOWN",
}
GLOBAL_TENSORS = {"embed_tokens.weight": "TOKEN_EMBD", "norm.weight": "OUTPUT_NORM",
                  "lm_head.weight": "OUTPUT"}


# --------------------------------------------------------------------------------------------
# Model


def gguf_arch(cfg: ModelConfig) -> str:
    """llama.cpp's architecture for `cfg`: "llama", or "qwen3" for QK-norm (Qwen3's only change
    to the Llama block); a UserError naming the field for what llama.cpp's llama cannot run."""
    if cfg.arch != "llama":
        raise UserError(f"model.arch={cfg.arch!r} cannot be exported to GGUF: only arch 'llama' "
                        "(RMSNorm, RoPE, SwiGLU) maps to a llama.cpp architecture")
    return "qwen3" if cfg.qk_norm else "llama"


def gguf_tensor_name(name: str) -> str:
    """llama.cpp's name for one of our parameters, e.g. `layers.3.mlp.up_proj.weight` ->
    `blk.3.ffn_up.weight`."""
    import gguf

    parts = name.split(".", 2)
    if parts[0] == "layers" and len(parts) == 3 and parts[2] in LAYER_TENSORS:
        tensor, block = LAYER_TENSORS[parts[2]], int(parts[1])
    elif name in GLOBAL_TENSORS:
        tensor, block = GLOBAL_TENSORS[name], 0
    else:
        raise UserError(f"tensor {name!r} has no llama.cpp equivalent")
    return gguf.TENSOR_NAMES[gguf.MODEL_TENSOR[tensor]].format(bid=block) + ".weight"


def interleave_rope(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Reorder a query/key projection's output rows within each head from the rotate-half layout
    (pairs j, j + d/2) to the interleaved one (pairs 2j, 2j + 1): row j goes to 2j, row j + d/2
    to 2j + 1. The attention scores are unchanged, since q and k are reordered alike."""
    rows, cols = weight.shape
    return weight.reshape(n_heads, 2, rows // n_heads // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def _gguf_tensors(state: dict[str, torch.Tensor], cfg: ModelConfig, arch: str) -> dict[str, np.ndarray]:
    """Our state dict as float32 numpy arrays under llama.cpp's names, in llama.cpp's RoPE layout."""
    out = {}
    for name, tensor in state.items():
        array = tensor.detach().float().cpu().numpy()
        if arch == "llama" and name.endswith("q_proj.weight"):
            array = interleave_rope(array, cfg.n_heads)
        elif arch == "llama" and name.endswith("k_proj.weight"):
            array = interleave_rope(array, cfg.kv_heads)
        out[gguf_tensor_name(name)] = array
    return out


def _add_tensor(writer: gguf.GGUFWriter, name: str, array: np.ndarray, dtype: str) -> None:
    """One tensor in `dtype`; 1-D ones (norms) stay f32, and a matrix whose rows do not split into
    q8_0's blocks of 32 falls back to f16 (as llama.cpp's converter does)."""
    import gguf
    import numpy as np

    if array.ndim == 1 or dtype == "f32":
        writer.add_tensor(name, np.ascontiguousarray(array, dtype=np.float32))
    elif dtype == "q8_0" and array.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
        quantized = gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0)
        writer.add_tensor(name, quantized, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    else:
        writer.add_tensor(name, np.ascontiguousarray(array, dtype=np.float16))


def _add_hyperparameters(writer: gguf.GGUFWriter, cfg: ModelConfig, dtype: str) -> None:
    import gguf

    writer.add_context_length(cfg.max_seq_len)
    writer.add_embedding_length(cfg.d_model)
    writer.add_block_count(cfg.n_layers)
    writer.add_feed_forward_length(cfg.ffn_dim)
    writer.add_head_count(cfg.n_heads)
    writer.add_head_count_kv(cfg.kv_heads)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype]
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


# --------------------------------------------------------------------------------------------
# Tokenizer


def pre_tokenizer(tok: Tokenizer) -> str:
    """llama.cpp's pre-tokenizer name for the tokenizer's split regex; a UserError when llama.cpp
    has none that applies it (it knows regexes by name only, it cannot take ours)."""
    try:
        return PRE_TOKENIZERS[tok.pattern]
    except KeyError:
        raise UserError(
            "the tokenizer's split pattern has no llama.cpp pre-tokenizer: GGUF export supports "
            "the default tokenizer.pattern with tokenizer.digits 3 or 1"
        ) from None


def check_tokenizer(tok: Tokenizer, vocab_size: int) -> str:
    """The pre-tokenizer name, after refusing (UserError) a tokenizer llama.cpp cannot use with
    an embedding of `vocab_size` rows."""
    if "<|endoftext|>" not in tok.special_tokens:  # else llama.cpp takes token 11 for the end of text
        raise UserError("the tokenizer has no <|endoftext|> special token, which GGUF needs as its "
                        "end-of-text token (tokenizer.special_tokens lists it by default)")
    if tok.vocab_size > vocab_size:
        raise UserError(f"the tokenizer has {tok.vocab_size} tokens but model.vocab_size={vocab_size}")
    return pre_tokenizer(tok)


def _add_tokenizer(writer: gguf.GGUFWriter, tok: Tokenizer, vocab_size: int) -> None:
    """The tokenizer as llama.cpp's `gpt2` model, padded with unused tokens up to the embedding's
    `vocab_size` rows (llama.cpp wants one token per row)."""
    import gguf

    from lmforge.tokenizer.export import byte_level_text, merge_pairs

    specials = {i: s for s, i in tok.special_tokens.items()}
    tokens, types = [], []
    for i in range(vocab_size):
        if i in specials:
            tokens.append(specials[i])
            types.append(gguf.TokenType.CONTROL)
        elif i < tok.vocab_size:
            tokens.append(byte_level_text(tok.token_bytes(i)))
            types.append(gguf.TokenType.NORMAL)
        else:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(check_tokenizer(tok, vocab_size))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([f"{byte_level_text(a)} {byte_level_text(b)}" for a, b in merge_pairs(tok)])
    # <|endoftext|> starts and ends a document; the chat format writes it itself (and our
    # `sample` does not prepend it), so llama.cpp must not add it to every prompt.
    writer.add_bos_token_id(tok.eot_id)
    writer.add_eos_token_id(tok.eot_id)
    if END in tok.special_tokens:
        writer.add_eot_token_id(tok.special_tokens[END])  # an assistant turn's end
    if "<|pad|>" in tok.special_tokens:
        writer.add_pad_token_id(tok.pad_id)
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)
    if all(t in tok.special_tokens for t in CHAT_TOKENS):
        writer.add_chat_template(CHAT_TEMPLATE)


# --------------------------------------------------------------------------------------------
# Export


def export_gguf(checkpoint: str | os.PathLike, out: str | os.PathLike, dtype: str = "f16") -> Path:
    """Write `out` (replacing it, atomically) as a GGUF file of the checkpoint (or a run
    directory's newest one; a LoRA checkpoint with its adapters merged) and its tokenizer."""
    try:
        import gguf
    except ImportError:
        raise UserError("GGUF export needs the `gguf` package: pip install gguf "
                        "(or lmforge's `export` extra)") from None
    from lmforge.checkpoint import TOKENIZER_DIR, load_model, read_config, resolve_checkpoint
    from lmforge.tokenizer import load_tokenizer

    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    directory = resolve_checkpoint(checkpoint)
    cfg = read_config(directory).model
    arch = gguf_arch(cfg)
    if not (directory / TOKENIZER_DIR).is_dir():
        raise UserError(f"{directory} has no {TOKENIZER_DIR}/ directory; a GGUF file needs the "
                        "checkpoint's tokenizer")
    tok = load_tokenizer(directory / TOKENIZER_DIR)
    check_tokenizer(tok, cfg.vocab_size)  # before loading the weights
    tensors = _gguf_tensors(load_model(directory).state_dict(), cfg, arch)
    out = Path(out)
    writer = gguf.GGUFWriter(None, arch)  # the file is opened, at a temporary path, below
    writer.add_name(Path(checkpoint).resolve().name)  # the run's name, not step_00000600
    _add_hyperparameters(writer, cfg, dtype)
    _add_tokenizer(writer, tok, cfg.vocab_size)
    for name, array in tensors.items():
        _add_tensor(writer, name, array, dtype)
    with atomic_file(out) as tmp:
        try:
            writer.write_header_to_file(tmp)
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
    return out


# --------------------------------------------------------------------------------------------
# CLI


def export_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, metavar="DIR",
                        help="checkpoint directory (or a run directory: its newest complete checkpoint)")
    parser.add_argument("--out", required=True, metavar="FILE.gguf", help="GGUF file to write")
    parser.add_argument("--dtype", choices=DTYPES, default="f16",
                        help="weights' type: f32 (exact), f16 (default, half the size) or q8_0 "
                             "(8-bit blocks, a quarter)")
    add_force_arg(parser)


def export_command(args: argparse.Namespace) -> int:
    check_output(args.out, args.force, directory=False)  # before loading the model
    out = export_gguf(args.checkpoint, args.out, args.dtype)
    print(f"wrote {out} (run it with llama.cpp: llama-cli -m {out})")
    return 0
