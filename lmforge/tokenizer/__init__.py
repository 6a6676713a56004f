"""Byte-level BPE tokenizer: our own trainer, tiktoken-served encoder, lossless decode, exports.

    from lmforge.tokenizer import train_tokenizer, load_tokenizer
    tok = train_tokenizer(texts, vocab_size=8192)      # texts: any iterable of str
    tok.save("tok/"); tok = load_tokenizer("tok/")
    ids = tok.encode("hello"); tok.decode(ids)

Modules: `train` (trainer), `sources` (streaming input), `tokenizer` (Tokenizer and its file
format), `reference` (readable reference trainer and encoder), `export` (Hugging Face and
tiktoken files), `cli` (the `lmforge tokenizer ...` commands).
"""

from lmforge.tokenizer.export import export_hf, export_tiktoken
from lmforge.tokenizer.tokenizer import Tokenizer, load_tokenizer
from lmforge.tokenizer.train import train_tokenizer

__all__ = ["Tokenizer", "export_hf", "export_tiktoken", "load_tokenizer", "train_tokenizer"]
