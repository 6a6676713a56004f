"""GGUF export, checked by gguf's own reader and by llama.cpp itself (llama-cpp-python, an
optional test dependency: those tests skip without it).

Always on: metadata and tensors read back (after undoing the RoPE permutation), tensor names
agree with gguf's own Hugging Face name map, the permutation turns our rotate-half RoPE into
llama.cpp's interleaved one (closed form), and a textbook BPE encoder fed the file's vocabulary
and merges gives our token ids. With llama.cpp: f32 logits within 1e-3 of ours and equal greedy
tokens, f16/q8_0 greedy tokens, its tokenizer on the tokenizer tests' strings, and a chat.
"""

from __future__ import annotations

import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import regex
import torch
from hypothesis import given
from test_tokenizer import PROPERTY, TRICKY, corpus_texts, unicode_text

from lmforge.chat.format import CHAT_TEMPLATE, render_prompt
from lmforge.checkpoint import read_config, save_model
from lmforge.config import TokenizerConfig, load_config
from lmforge.engine import generate
from lmforge.errors import UserError
from lmforge.interop.gguf import export_gguf, interleave_rope
from lmforge.model import Transformer, apply_rope, rope_tables
from lmforge.tokenizer import Tokenizer, train_tokenizer
from lmforge.tokenizer.export import bytes_to_unicode

gguf = pytest.importorskip("gguf")

PAD_ROWS = 9  # embedding rows beyond the tokenizer: llama.cpp needs a token for each
SHAPES = {
    "llama": ["model.n_kv_heads=2", "model.tie_embeddings=false"],
    "llama-tied": [],
    "qwen3": ["model.qk_norm=true", "model.n_kv_heads=2"],
}


def texts() -> list[str]:
    """The tokenizer tests' round-trip strings: its tricky pieces and some real text."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    real = [(stdlib / n).read_text(encoding="utf-8")[:20_000] for n in ("difflib.py", "heapq.py")]
    return [*TRICKY, "".join(TRICKY), *real, "<|user|>hi<|end|><|assistant|>yo<|endoftext|><|pad|>"]


@pytest.fixture(scope="module", params=[3, 1], ids=["digits3", "digits1"])
def tok(request) -> Tokenizer:
    pattern = TokenizerConfig(digits=request.param).split_pattern
    return train_tokenizer(corpus_texts(), vocab_size=700, pattern=pattern, workers=1)


def make_checkpoint(root: Path, tok: Tokenizer, shape: str = "llama", std: float = 0.1,
                    pad_rows: int = PAD_ROWS, quiet: tuple[str, ...] = ()) -> Path:
    """A random model over `tok` (plus `pad_rows` unused embedding rows); the `quiet` special
    tokens get a zero embedding, so with tied embeddings their logit is 0, never a greedy pick."""
    cfg = load_config(overrides=[f"model.vocab_size={tok.vocab_size + pad_rows}", "model.d_model=64",
                                 "model.n_layers=2", "model.n_heads=4", "model.max_seq_len=256",
                                 f"model.init_std={std}", *SHAPES[shape]])
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    with torch.no_grad():  # norms away from 1, so a misplaced norm weight shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.2)
        for token in quiet:
            model.embed_tokens.weight[tok.special_tokens[token]] = 0
    tok.save(root / "tok")
    return save_model(model.eval(), cfg, root / f"ckpt-{shape}", tokenizer_dir=root / "tok")


@pytest.fixture(scope="module")
def exported(tok, tmp_path_factory):
    """(tokenizer, checkpoint, {dtype: file}) of the untied GQA llama model."""
    root = tmp_path_factory.mktemp("gguf")
    ckpt = make_checkpoint(root, tok)
    return tok, ckpt, {d: export_gguf(ckpt, root / f"model-{d}.gguf", d) for d in ("f32", "f16", "q8_0")}


def fields(path: Path) -> dict:
    reader = gguf.GGUFReader(path)
    return {name: field.contents() for name, field in reader.fields.items()}


# -- gguf's reader -------------------------------------------------------------------------------


def test_metadata_reads_back(exported):
    tok, ckpt, files = exported
    meta = fields(files["f16"])
    cfg = read_config(ckpt).model
    assert meta["general.architecture"] == "llama"
    expected = {
        "llama.context_length": 256, "llama.embedding_length": 64, "llama.block_count": 2,
        "llama.feed_forward_length": cfg.ffn_dim, "llama.attention.head_count": 4,
        "llama.attention.head_count_kv": 2, "llama.rope.dimension_count": 16,
        "llama.vocab_size": tok.vocab_size + PAD_ROWS, "general.file_type": gguf.LlamaFileType.MOSTLY_F16,
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.bos_token_id": tok.eot_id,
        "tokenizer.ggml.eos_token_id": tok.eot_id, "tokenizer.ggml.eot_token_id": tok.special_tokens["<|end|>"],
        "tokenizer.ggml.padding_token_id": tok.pad_id, "tokenizer.ggml.add_bos_token": False,
        "tokenizer.chat_template": CHAT_TEMPLATE,
    }
    assert {k: meta[k] for k in expected} == expected
    assert meta["llama.rope.freq_base"] == pytest.approx(cfg.rope_theta)
    assert meta["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(cfg.norm_eps)
    assert meta["tokenizer.ggml.pre"] == ("llama-bpe" if r"\p{N}{1,3}" in tok.pattern else "qwen2")
    assert fields(files["q8_0"])["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    # Tokens: byte-level spellings of our bytes, specials as control tokens, padding unused.
    to_byte = {c: b for b, c in bytes_to_unicode().items()}
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == tok.vocab_size + PAD_ROWS
    specials = {i: s for s, i in tok.special_tokens.items()}
    for i, (text, kind) in enumerate(zip(tokens, types)):
        if i in specials:
            assert (text, kind) == (specials[i], gguf.TokenType.CONTROL)
        elif i < tok.vocab_size:
            assert bytes(to_byte[c] for c in text) == tok.token_bytes(i) and kind == gguf.TokenType.NORMAL
        else:
            assert kind == gguf.TokenType.UNUSED


def _our_tensors(ckpt: Path) -> dict[str, np.ndarray]:
    from lmforge import load_model

    return {n: t.float().numpy() for n, t in load_model(ckpt).state_dict().items()}


def _undo_interleave(w: np.ndarray, heads: int) -> np.ndarray:
    rows, cols = w.shape
    return w.reshape(heads, rows // heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


@pytest.mark.parametrize("dtype", ["f32", "f16", "q8_0"])
def test_tensors_read_back(exported, dtype):
    tok, ckpt, files = exported
    ours = _our_tensors(ckpt)
    # gguf's own map from Hugging Face Llama names (ours plus "model.") to llama.cpp's.
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
    expected_names = {name_map.get_name(n if n.startswith("lm_head") else f"model.{n}",
                                        try_suffixes=(".weight",)): n for n in ours}
    reader = gguf.GGUFReader(files[dtype])
    assert {t.name for t in reader.tensors} == set(expected_names)  # nothing extra, nothing missing
    for t in reader.tensors:
        name = expected_names[t.name]
        want = ours[name]
        got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(want.shape)
        heads = {"q_proj": 4, "k_proj": 2}.get(name.split(".")[-2])
        if heads:
            got = _undo_interleave(got, heads)
        if want.ndim == 1 or dtype == "f32":
            assert t.tensor_type == gguf.GGMLQuantizationType.F32 and np.array_equal(got, want), name
        elif dtype == "f16":
            assert np.array_equal(got, want.astype(np.float16).astype(np.float32)), name
        else:  # q8_0: blocks of 32 in steps of max|x| / 127 (kept in f16): error < 0.6 step
            assert t.tensor_type == gguf.GGMLQuantizationType.Q8_0, name
            blocks_want, blocks_got = want.reshape(-1, 32), got.reshape(-1, 32)
            step = np.abs(blocks_want).max(axis=1, keepdims=True) / 127
            assert (np.abs(blocks_got - blocks_want) <= 0.6 * step).all(), name


def test_q8_0_keeps_rows_that_do_not_split_into_blocks_of_32_in_f16(tmp_path):
    tok = train_tokenizer(["the cat sat on the mat " * 30], vocab_size=300, workers=1)
    tok.save(tmp_path / "tok")
    cfg = load_config(overrides=["model.vocab_size=300", "model.d_model=48", "model.n_layers=1",
                                 "model.n_heads=4", "model.d_ff=64"])
    ckpt = save_model(Transformer(cfg.model), cfg, tmp_path / "ckpt", tokenizer_dir=tmp_path / "tok")
    reader = gguf.GGUFReader(export_gguf(ckpt, tmp_path / "m.gguf", "q8_0"))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.ffn_down.weight"] == "Q8_0"  # rows of d_ff = 64
    assert types["blk.0.attn_q.weight"] == types["token_embd.weight"] == "F16"  # rows of 48
    assert types["blk.0.attn_norm.weight"] == "F32"


def test_interleave_turns_rotate_half_rope_into_llama_cpp_rope():
    """llama.cpp's llama RoPE rotates pairs (2i, 2i+1) by position * theta^(-2i/d); applied to the
    permuted query rows it equals our rotate-half RoPE followed by the same permutation."""
    heads, d, positions = 3, 8, 5
    q = torch.randn(positions, heads * d, generator=torch.Generator().manual_seed(0))
    cos, sin = rope_tables(d, positions, 500.0)
    ours = apply_rope(q.view(positions, heads, d).transpose(0, 1), cos, sin).transpose(0, 1)
    ours_permuted = interleave_rope(ours.reshape(positions, -1).T.numpy(), heads).T
    x = interleave_rope(q.T.numpy(), heads).T.reshape(positions, heads, d // 2, 2)
    angle = np.arange(positions)[:, None, None] * 500.0 ** (-2 * np.arange(d // 2) / d)
    x0, x1 = x[..., 0], x[..., 1]
    theirs = np.stack([x0 * np.cos(angle) - x1 * np.sin(angle),
                       x0 * np.sin(angle) + x1 * np.cos(angle)], axis=-1).reshape(positions, -1)
    np.testing.assert_allclose(ours_permuted, theirs, atol=1e-5)


def _textbook_bpe(text: str, pattern: str, vocab: dict[str, int], ranks: dict, whole_tokens: bool) -> list[int]:
    """Standard BPE over the file's vocabulary and ranked merges: in each regex chunk merge the
    adjacent pair of lowest rank (leftmost on ties) until none is left; with `whole_tokens`, a
    chunk that is a token is taken whole (llama.cpp's ignore_merges, set by its llama-bpe)."""
    to_char = bytes_to_unicode()
    ids: list[int] = []
    for chunk in regex.findall(pattern, text):
        word = "".join(to_char[b] for b in chunk.encode("utf-8"))
        if whole_tokens and word in vocab:
            ids.append(vocab[word])
            continue
        symbols = list(word)
        while True:
            pairs = [(ranks[p], i) for i, p in enumerate(zip(symbols, symbols[1:])) if p in ranks]
            if not pairs:
                break
            i = min(pairs)[1]
            symbols[i:i + 2] = [symbols[i] + symbols[i + 1]]
        ids += [vocab[s] for s in symbols]
    return ids


def test_textbook_bpe_on_the_file_gives_our_ids(exported):
    tok, _, files = exported
    meta = fields(files["f32"])
    vocab = {t: i for i, t in enumerate(meta["tokenizer.ggml.tokens"][:tok.vocab_size])}
    ranks = {tuple(m.split(" ")): r for r, m in enumerate(meta["tokenizer.ggml.merges"])}
    whole = meta["tokenizer.ggml.pre"] == "llama-bpe"
    for text in texts()[:-1]:
        assert _textbook_bpe(text, tok.pattern, vocab, ranks, whole) == tok.encode(text), text[:40]


def test_a_lora_checkpoint_exports_as_its_merged_model(tmp_path):
    """As every reader of checkpoints: the adapters merged in (the same file as `lora merge`'s)."""
    from test_lora import base_model, config, lora_model

    from lmforge.cli import main
    from lmforge.finetune import lora

    train_tokenizer(["the adapters and the base model, merged or not"] * 20, vocab_size=300).save(tmp_path / "tok")
    cfg = config()
    base = save_model(base_model(cfg), cfg, tmp_path / "base", tokenizer_dir=tmp_path / "tok")
    ckpt = lora.save_lora_checkpoint(lora_model(cfg), cfg, tmp_path / "lora", lora.base_reference(base),
                                     tmp_path / "tok")
    assert main(["lora", "merge", "--checkpoint", str(ckpt), "--out", str(tmp_path / "merged")]) == 0

    def tensors(checkpoint: Path) -> dict[str, np.ndarray]:
        reader = gguf.GGUFReader(export_gguf(checkpoint, tmp_path / f"{checkpoint.name}.gguf", "f32"))
        return {t.name: np.array(t.data) for t in reader.tensors}

    adapted, merged, plain = tensors(ckpt), tensors(tmp_path / "merged"), tensors(base)
    assert adapted.keys() == merged.keys() and all(np.array_equal(adapted[n], merged[n]) for n in merged)
    assert not np.array_equal(adapted["blk.0.attn_q.weight"], plain["blk.0.attn_q.weight"])


# -- refusals and the CLI ------------------------------------------------------------------------


def test_what_llama_cpp_cannot_run_is_a_clear_error(tmp_path):
    tok = train_tokenizer(["the cat sat on the mat " * 30], vocab_size=300, workers=1)
    tok.save(tmp_path / "tok")
    small = ["model.vocab_size=300", "model.d_model=32", "model.n_layers=1", "model.n_heads=2"]
    gpt2 = save_model(Transformer(load_config(overrides=[*small, "model.arch=gpt2"]).model),
                      load_config(overrides=[*small, "model.arch=gpt2"]), tmp_path / "gpt2",
                      tokenizer_dir=tmp_path / "tok")
    with pytest.raises(UserError, match="model.arch='gpt2'"):
        export_gguf(gpt2, tmp_path / "x.gguf")
    cfg = load_config(overrides=small)
    bare = save_model(Transformer(cfg.model), cfg, tmp_path / "bare")
    with pytest.raises(UserError, match="no tokenizer/ directory"):
        export_gguf(bare, tmp_path / "x.gguf")
    two = train_tokenizer(["the cat 1234 " * 30], vocab_size=300, workers=1,
                          pattern=TokenizerConfig(digits=2).split_pattern)
    two.save(tmp_path / "tok2")
    digits2 = save_model(Transformer(cfg.model), cfg, tmp_path / "digits2", tokenizer_dir=tmp_path / "tok2")
    with pytest.raises(UserError, match="tokenizer.digits 3 or 1"):
        export_gguf(digits2, tmp_path / "x.gguf")
    bare_tok = train_tokenizer(["the cat " * 30], vocab_size=270, workers=1, special_tokens=["<|pad|>"])
    bare_tok.save(tmp_path / "tok3")
    no_eot = save_model(Transformer(cfg.model), cfg, tmp_path / "no_eot", tokenizer_dir=tmp_path / "tok3")
    with pytest.raises(UserError, match=re.escape("no <|endoftext|> special token")):
        export_gguf(no_eot, tmp_path / "x.gguf")
    with pytest.raises(UserError, match="--dtype 'q4'"):
        export_gguf(bare, tmp_path / "x.gguf", "q4")
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".x.gguf*"))


def test_cli_writes_and_refuses_to_overwrite(tmp_path):
    tok = train_tokenizer(["the cat sat on the mat " * 30], vocab_size=300, workers=1)
    ckpt = make_checkpoint(tmp_path, tok)
    out = tmp_path / "m.gguf"

    def run() -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "lmforge", "export", "gguf", "--checkpoint", str(ckpt),
                               "--out", str(out), "--dtype", "q8_0"], capture_output=True, text=True, timeout=300)

    first = run()
    assert first.returncode == 0, first.stderr
    assert fields(out)["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    again = run()
    assert again.returncode == 2 and "already exists" in again.stderr and "Traceback" not in again.stderr


# -- llama.cpp itself ----------------------------------------------------------------------------


def llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        pytest.skip("llama-cpp-python is not installed (pip install llama-cpp-python): "
                    "llama.cpp cannot load the exported files here")
    return llama_cpp


def load(path: Path, **kw):
    """llama.cpp on the file, with an f32 KV cache (its default f16 cache alone moves logits by ~1e-3)."""
    lib = llama_cpp()
    return lib.Llama(model_path=str(path), n_ctx=256, logits_all=True, verbose=False, seed=0, n_threads=1,
                     type_k=lib.GGML_TYPE_F32, type_v=lib.GGML_TYPE_F32, **kw)


PROMPT = "def encode(self, text):\n    return [1, 2, 3] # 日本語"


def greedy_llama_cpp(llm, prompt: list[int], n: int) -> list[int]:
    out = []
    llm.reset()
    for token in llm.generate(prompt, top_k=1, temp=0.0, reset=True):
        out.append(token)
        if len(out) == n:
            break
    return out


@pytest.mark.parametrize("shape", list(SHAPES))
def test_llama_cpp_logits_and_greedy_tokens_equal_ours_f32(tok, tmp_path, shape):
    llama_cpp()
    from lmforge import load_model

    ckpt = make_checkpoint(tmp_path, tok, shape)
    llm = load(export_gguf(ckpt, tmp_path / "m.gguf", "f32"))
    ours = load_model(ckpt)
    ids = tok.encode(PROMPT)
    llm.eval(ids)
    theirs = np.asarray(llm.scores[: len(ids)])
    with torch.no_grad():
        logits = ours(torch.tensor([ids]))[0].numpy()
    assert np.abs(theirs - logits).max() <= 1e-3
    new = generate(ours, torch.tensor([ids]), 30, temperature=0)[0, len(ids):].tolist()
    assert greedy_llama_cpp(llm, ids, 30) == new


@pytest.mark.parametrize("dtype", ["f16", "q8_0"])
def test_llama_cpp_greedy_tokens_f16_and_q8_0(tok, tmp_path, dtype):
    """A peaked random model (large init), so that rounding the weights does not flip a pick."""
    llama_cpp()
    from lmforge import load_model

    ckpt = make_checkpoint(tmp_path, tok, "llama", std=0.4)
    llm = load(export_gguf(ckpt, tmp_path / "m.gguf", dtype))
    ids = tok.encode("the cat")
    new = generate(load_model(ckpt), torch.tensor([ids]), 8, temperature=0)[0, len(ids):].tolist()
    assert greedy_llama_cpp(llm, ids, 8) == new


@pytest.fixture(scope="module")
def vocab_only(exported):
    tok, _, files = exported
    return tok, load(files["f32"], vocab_only=True)


def test_llama_cpp_tokenizer_gives_our_ids(vocab_only):
    tok, llm = vocab_only
    for text in texts():
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == tok.encode(text), text[:40]
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == \
            tok.encode(text, allowed_special="all"), text[:40]
        assert llm.detokenize(tok.encode(text)) == text.encode()


@PROPERTY
@given(text=unicode_text)
def test_llama_cpp_tokenizer_property(vocab_only, text):
    tok, llm = vocab_only
    assert llm.tokenize(text.encode(), add_bos=False, special=True) == tok.encode(text, allowed_special="all")
    assert llm.tokenize(text.encode(), add_bos=False, special=False) == tok.encode(text)


def test_llama_cpp_chats_with_the_template(tmp_path):
    """llama.cpp renders our chat format from the file's template and its greedy answer, stopping
    at <|end|>, is ours."""
    llama_cpp()
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    from lmforge import load_model

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    tok = train_tokenizer([(stdlib / "textwrap.py").read_text(encoding="utf-8")], vocab_size=500, workers=1)
    # Tied, no padding rows, every special token but <|end|> quiet: a reply of text that may end.
    quiet = tuple(t for t in tok.special_tokens if t != "<|end|>")
    ckpt = make_checkpoint(tmp_path, tok, "llama-tied", std=0.3, pad_rows=0, quiet=quiet)
    llm = load(export_gguf(ckpt, tmp_path / "chat.gguf", "f32"))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+3?"}]
    template = llm.metadata["tokenizer.chat_template"]
    rendered = Jinja2ChatFormatter(template, eos_token="<|endoftext|>", bos_token="<|endoftext|>")(
        messages=messages).prompt
    prompt = render_prompt(tok, messages)
    assert llm.tokenize(rendered.encode(), add_bos=False, special=True) == prompt
    reply = llm.create_chat_completion(messages=messages, max_tokens=12, temperature=0.0, top_k=1)
    ours = generate(load_model(ckpt), torch.tensor([prompt]), 12, temperature=0)[0, len(prompt):].tolist()
    stop = tok.special_tokens["<|end|>"]
    ours = ours[: ours.index(stop)] if stop in ours else ours
    # llama-cpp-python drops bytes that are not UTF-8 from the text it returns.
    assert reply["choices"][0]["message"]["content"] == tok.decode_bytes(ours).decode("utf-8", "ignore")
