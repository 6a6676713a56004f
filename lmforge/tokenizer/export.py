"""Export a tokenizer for other tools: a Hugging Face `tokenizer.json`, or a tiktoken rank file.

Hugging Face: a `tokenizers` BPE model behind a Split pre-tokenizer with our regex and a ByteLevel
step that maps each byte to a printable character (the GPT-2 byte-to-unicode table). Two settings
make it apply exactly our (tiktoken's) rule, see `lmforge.tokenizer.reference`:
  * `ignore_merges: true` - a chunk that is itself a token is taken whole (rule step 3);
  * the merge list holds every way to join two tokens into a third (not only the merge we
    learned), ranked by the id of the result - tiktoken merges any adjacent pair whose joined
    bytes are a token, lowest id first (rule step 4).
Special tokens are added tokens; note that Hugging Face always treats them as special in input
text, like our `encode(text, allowed_special="all")`. A tokenizer with the chat tokens also gets
our chat format as the Jinja `chat_template` (see `lmforge.chat.format`), so `apply_chat_template`
gives the ids of `render_conversation` / `render_prompt`.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path

from lmforge.atomic import atomic_write_json, atomic_write_text
from lmforge.chat.format import CHAT_TEMPLATE, CHAT_TOKENS
from lmforge.tokenizer.tokenizer import Tokenizer, load_tokenizer

TIKTOKEN_FILE = "tokenizer.tiktoken"
# The files each format writes into its output directory (and nothing else).
EXPORT_FILES = {
    "hf": ("tokenizer.json", "special_tokens_map.json", "tokenizer_config.json"),
    "tiktoken": (TIKTOKEN_FILE, "tiktoken_config.json"),
}


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by HF ByteLevel.

    Printable Latin-1 bytes map to themselves; the other 68 bytes (controls, space, ...) map to
    U+0100 onwards in byte order, so every byte becomes one visible, non-whitespace character.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


_BYTE_TO_CHAR = bytes_to_unicode()


def byte_level_text(token: bytes) -> str:
    """A token's bytes as GPT-2 byte-level text (one printable character per byte), the spelling
    Hugging Face's ByteLevel BPE and llama.cpp's `gpt2` tokenizer model use in their vocabularies."""
    return "".join(_BYTE_TO_CHAR[b] for b in token)


def merge_pairs(tok: Tokenizer) -> list[tuple[bytes, bytes]]:
    """Ranked merges that make a standard BPE encoder (merge the adjacent pair of lowest rank,
    leftmost first) give our ids: every way to join two tokens into a third, ranked by the id of
    the result (tiktoken merges the pair whose joined bytes have the lowest id). Each token's
    learned merge comes first, so `tokenizer_from_hf` can read the merges back."""
    pairs = []
    for token_id, learned in enumerate(tok.merges, start=256):
        token = tok.token_bytes(token_id)
        pairs.append((tok.token_bytes(learned[0]), tok.token_bytes(learned[1])))
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in tok.ranks and right in tok.ranks and (tok.ranks[left], tok.ranks[right]) != learned:
                pairs.append((left, right))
    return pairs


def hf_tokenizer_json(tok: Tokenizer) -> dict:
    """The Hugging Face `tokenizers` JSON document equivalent to `tok`."""
    vocab = {byte_level_text(tok.token_bytes(i)): i for i in range(256 + len(tok.merges))}
    merges = [[byte_level_text(left), byte_level_text(right)] for left, right in merge_pairs(tok)]
    added = [
        {"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True}
        for s, i in sorted(tok.special_tokens.items(), key=lambda item: item[1])
    ]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": tok.pattern}, "behavior": "Isolated",
                 "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                 "use_regex": False},
            ],
        },
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                    "use_regex": False},
        "model": {
            "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
            "ignore_merges": True, "vocab": vocab, "merges": merges,
        },
    }


def export_hf(tokenizer_dir: str | os.PathLike | Tokenizer, out_dir: str | os.PathLike) -> Path:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into `out_dir`.

    `transformers.PreTrainedTokenizerFast.from_pretrained(out_dir)` then gives our ids.
    """
    tok = tokenizer_dir if isinstance(tokenizer_dir, Tokenizer) else load_tokenizer(tokenizer_dir)
    out = Path(out_dir)
    atomic_write_json(out / "tokenizer.json", hf_tokenizer_json(tok))
    roles = {"eos_token": "<|endoftext|>", "pad_token": "<|pad|>"}
    special_map = {k: v for k, v in roles.items() if v in tok.special_tokens}
    special_map["additional_special_tokens"] = [
        s for s in tok.special_tokens if s not in special_map.values()
    ]
    atomic_write_json(out / "special_tokens_map.json", special_map)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1_000_000_000,
        "lmforge_content_hash": tok.content_hash,
        **special_map,
    }
    if all(t in tok.special_tokens for t in CHAT_TOKENS):
        config["chat_template"] = CHAT_TEMPLATE
    atomic_write_json(out / "tokenizer_config.json", config)
    return out


def tokenizer_from_hf(directory: str | os.PathLike) -> Tokenizer | None:
    """The tokenizer of a Hugging Face `tokenizer.json` written by `export_hf` (so `import hf` keeps
    it), or None for one lmforge cannot represent: not byte-level BPE, or base ids that are not the
    256 bytes in order (Llama 3, Qwen). Merges are the first split listed for each token, which
    `export_hf` writes as the learned one, so an export's content hash comes back unchanged."""
    import json

    path = Path(directory) / "tokenizer.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        model, pre = data["model"], data["pre_tokenizer"]["pretokenizers"]
        split = next(p for p in pre if p["type"] == "Split")
        pattern = split["pattern"]["Regex"]
        vocab: dict[str, int] = model["vocab"]
        merges_text = model["merges"]
        added = {t["content"]: t["id"] for t in data.get("added_tokens", []) if t.get("special")}
    except (OSError, ValueError, KeyError, TypeError, StopIteration):
        return None
    if model.get("type") != "BPE":
        return None
    to_byte = {c: b for b, c in bytes_to_unicode().items()}
    try:
        by_id = {i: bytes(to_byte[c] for c in t) for t, i in vocab.items()}
    except KeyError:
        return None
    if any(by_id.get(b) != bytes([b]) for b in range(256)) or sorted(by_id) != list(range(len(by_id))):
        return None
    ranks = {b: i for i, b in by_id.items()}
    learned: dict[int, tuple[int, int]] = {}
    for pair in merges_text:
        left, right = pair if isinstance(pair, list) else pair.split(" ", 1)
        a, b = ranks.get(bytes(to_byte[c] for c in left)), ranks.get(bytes(to_byte[c] for c in right))
        joined = ranks.get(by_id.get(a, b"") + by_id.get(b, b"")) if a is not None and b is not None else None
        if joined is not None:
            learned.setdefault(joined, (a, b))
    try:
        return Tokenizer([learned[i] for i in range(256, len(by_id))], pattern, added)
    except (KeyError, ValueError):
        return None


def export_tiktoken(tokenizer_dir: str | os.PathLike | Tokenizer, out_dir: str | os.PathLike) -> Path:
    """Write `tokenizer.tiktoken` (base64 token bytes and rank per line, tiktoken's own format,
    readable by `tiktoken.load.load_tiktoken_bpe`) and `tiktoken_config.json` (pattern, specials)."""
    tok = tokenizer_dir if isinstance(tokenizer_dir, Tokenizer) else load_tokenizer(tokenizer_dir)
    out = Path(out_dir)
    lines = [f"{base64.b64encode(token).decode('ascii')} {rank}\n" for token, rank in tok.ranks.items()]
    atomic_write_text(out / TIKTOKEN_FILE, "".join(lines))
    atomic_write_json(out / "tiktoken_config.json", {
        "pat_str": tok.pattern,
        "special_tokens": tok.special_tokens,
        "mergeable_ranks_file": TIKTOKEN_FILE,
        "content_hash": tok.content_hash,
    })
    return out
