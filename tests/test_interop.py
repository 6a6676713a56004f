"""Hugging Face interop: transformers itself loads our exports and we load its (local) models."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import lmforge
from lmforge.checkpoint import save_model
from lmforge.config import load_config
from lmforge.engine import generate
from lmforge.errors import UserError
from lmforge.interop.hf import export_hf, import_hf
from lmforge.model import Transformer

transformers = pytest.importorskip("transformers")

SMALL = ["model.vocab_size=300", "model.d_model=64", "model.n_layers=2", "model.n_heads=4",
         "model.max_seq_len=64"]


def checkpoint(tmp_path, *overrides: str, name: str = "ckpt"):
    cfg = load_config(overrides=[*SMALL, *overrides])
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(torch.randn_like(p) * 0.1)
    return save_model(model, cfg, tmp_path / name)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lmforge", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("overrides, hf_class", [
    ((), "LlamaForCausalLM"),
    (("model.tie_embeddings=false", "model.n_kv_heads=1"), "LlamaForCausalLM"),
    (("model.qk_norm=true", "model.n_kv_heads=2"), "Qwen3ForCausalLM"),
    (("model.qk_norm=true", "model.tie_embeddings=false"), "Qwen3ForCausalLM"),
])
def test_export_loads_in_transformers_with_equal_logits(tmp_path, overrides, hf_class):
    ckpt = checkpoint(tmp_path, *overrides)
    out = export_hf(ckpt, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__ == hf_class
    ours = lmforge.load_model(ckpt)
    idx = torch.randint(0, 300, (2, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (ours(idx) - hf(idx).logits).abs().max().item() <= 1e-4


@pytest.mark.parametrize("qk_norm, tied", [(False, False), (True, True)])
def test_import_of_a_transformers_model(tmp_path, qk_norm, tied):
    kw = dict(vocab_size=256, hidden_size=48, intermediate_size=100, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=12, max_position_embeddings=40,
              rms_norm_eps=1e-6, tie_word_embeddings=tied, rope_theta=1234.0)
    torch.manual_seed(1)
    if qk_norm:
        hf = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**kw))
    else:
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw))
    hf.eval().save_pretrained(tmp_path / "hf")
    out = import_hf(tmp_path / "hf", tmp_path / "ckpt")
    ours = lmforge.load_model(out)
    assert ours.cfg.qk_norm == qk_norm and ours.cfg.tie_embeddings == tied
    assert ours.cfg.rope_theta == 1234.0 and ours.cfg.kv_heads == 2
    idx = torch.randint(0, 256, (1, 25), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (ours(idx) - hf(idx).logits).abs().max().item() <= 1e-4


def test_import_refuses_unsupported_models(tmp_path):
    src = tmp_path / "hf"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "gpt_neox", "architectures": ["GPTNeoXForCausalLM"]}))
    with pytest.raises(UserError, match="unsupported architecture"):
        import_hf(src, tmp_path / "out")
    llama3 = dict(model_type="llama", vocab_size=10, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                  intermediate_size=16, rope_scaling={"rope_type": "llama3", "factor": 8.0})
    (src / "config.json").write_text(json.dumps(llama3))
    with pytest.raises(UserError, match="rope_scaling"):
        import_hf(src, tmp_path / "out")
    llama3.pop("rope_scaling")
    (src / "config.json").write_text(json.dumps(llama3))
    (src / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(UserError, match="safetensors only"):
        import_hf(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_gpt2_arch_cannot_be_exported(tmp_path):
    ckpt = checkpoint(tmp_path, "model.arch=gpt2")
    with pytest.raises(UserError, match="arch 'llama'"):
        export_hf(ckpt, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_cli_init_export_and_transformers_greedy_generate_agree(tmp_path):
    ckpt, out = tmp_path / "ckpt", tmp_path / "hf"
    r = run_cli("init", "--preset", "tiny", "--set", "model.n_layers=2", "--set", "model.vocab_size=512",
                "--out", str(ckpt))
    assert r.returncode == 0, r.stderr
    r = run_cli("export", "hf", "--checkpoint", str(ckpt), "--out", str(out))
    assert r.returncode == 0, r.stderr
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ours = lmforge.load_model(ckpt)
    prompt = torch.tensor([[5, 17, 300, 2, 9]])
    with torch.no_grad():
        theirs = hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                             max_new_tokens=40, min_new_tokens=40, pad_token_id=0)
    assert torch.equal(generate(ours, prompt, 40, temperature=0), theirs)


def checkpoint_with_tokenizer(tmp_path):
    """A small random checkpoint with a small trained tokenizer: (tokenizer, checkpoint dir)."""
    from lmforge.tokenizer import train_tokenizer

    text = ["the cat sat on the mat, and the dog sat on the log. " * 20, "a b c d e f g 123 456"]
    tok = train_tokenizer(text, vocab_size=300, progress=False)
    tok.save(tmp_path / "tok")
    cfg = load_config(overrides=[*SMALL, "tokenizer.vocab_size=300"])
    torch.manual_seed(0)
    ckpt = save_model(Transformer(cfg.model), cfg, tmp_path / "ckpt", tokenizer_dir=tmp_path / "tok")
    return tok, ckpt


def test_export_carries_the_tokenizer(tmp_path):
    tok, ckpt = checkpoint_with_tokenizer(tmp_path)
    out = export_hf(ckpt, tmp_path / "hf")
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    sample = "the cat sat on the log 123"
    assert hf_tok(sample)["input_ids"] == tok.encode(sample)
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == tok.special_tokens["<|endoftext|>"]
    assert transformers.AutoModelForCausalLM.from_pretrained(out).config.eos_token_id == generation["eos_token_id"]


def test_import_carries_the_tokenizer_back_and_sample_runs(tmp_path):
    """export hf -> import hf keeps the tokenizer (same content hash), so `sample` works on it."""
    from lmforge.cli import main
    from lmforge.tokenizer import load_tokenizer

    tok, ckpt = checkpoint_with_tokenizer(tmp_path)
    export_hf(ckpt, tmp_path / "hf")
    back = import_hf(tmp_path / "hf", tmp_path / "back")
    assert load_tokenizer(back / "tokenizer").content_hash == tok.content_hash
    assert main(["sample", "--checkpoint", str(back), "--prompt", "the cat", "--max-new-tokens", "3"]) == 0
