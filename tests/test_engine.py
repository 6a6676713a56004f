"""The inference engine: ragged batches, continuous batching, stops, streaming text, seeds.

Truths: the batch-1 `generate` path and a full forward without any cache (the model recomputed
from scratch), a lone request for a request that joined a running batch, the string itself for
streamed text, and a stop string found in the unstopped text."""

from __future__ import annotations

import math
import sysconfig
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lmforge.config import load_config
from lmforge.engine import (
    BATCHED_DECODE_ATTENTION_ROWS,
    STOP_TOKENS,
    Engine,
    KVCache,
    RaggedKVCache,
    SamplingParams,
    _Sequence,
    generate,
    sample_rows,
)
from lmforge.model import Transformer
from lmforge.tokenizer import train_tokenizer

PROMPTS = [[5, 17, 300], [9, 40, 41, 42, 43, 44, 45, 46, 47], [260], [100, 101, 102, 103, 104]]


@pytest.fixture(scope="module")
def tok():
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return train_tokenizer([(stdlib / "textwrap.py").read_text(encoding="utf-8")], vocab_size=400, workers=1)


def tiny_model(tok, arch: str = "llama", max_seq_len: int = 48) -> Transformer:
    # A large init spread makes the logits peaked: greedy picks are far from ties, so the
    # comparisons across batch shapes test the engine, not float rounding.
    cfg = load_config(overrides=[f"model.vocab_size={tok.vocab_size}", f"model.arch={arch}",
                                 "model.d_model=32", "model.n_layers=2", "model.n_heads=4",
                                 "model.n_kv_heads=2", f"model.max_seq_len={max_seq_len}", "model.init_std=0.3"])
    torch.manual_seed(0)
    return Transformer(cfg.model).eval()


@pytest.fixture(scope="module")
def model(tok):
    return tiny_model(tok)


def alone(model, tok, prompt, max_tokens) -> list[int]:
    """Greedy tokens of one prompt through the batch-1 path, cut at the first stop token."""
    stops = [tok.special_tokens[t] for t in STOP_TOKENS]
    out = generate(model, torch.tensor([prompt]), max_tokens, temperature=0,
                   vocab_limit=tok.vocab_size)[0, len(prompt):].tolist()
    cut = [i for i, t in enumerate(out) if t in stops]
    return out[:cut[0]] if cut else out


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_ragged_cache_decoding_equals_full_recomputation(tok, arch):
    model = tiny_model(tok, arch)
    cache = RaggedKVCache(model.cfg, 4, model.cfg.max_seq_len, "cpu", torch.float32)
    seqs = [list(p) for p in PROMPTS]
    lengths = [len(p) for p in seqs]
    idx = torch.zeros(len(seqs), max(lengths), dtype=torch.long)
    for i, p in enumerate(seqs):
        idx[i, :len(p)] = torch.tensor(p)
    cache.use_rows(0, len(seqs))
    with torch.no_grad():
        h = model.hidden_states(idx, cache)
        for row, n in enumerate(lengths):
            cache.set_length(row, n)
        logits = model.head(model.norm(h[torch.arange(len(seqs)), torch.tensor(lengths) - 1]))
        for step in range(6):
            for row, p in enumerate(seqs):
                full = model(torch.tensor([p]))[0, -1]
                torch.testing.assert_close(logits[row], full, atol=1e-4, rtol=1e-4)
            new = [(7 * step + 3 * row) % 250 + 1 for row in range(len(seqs))]
            for p, t in zip(seqs, new, strict=True):
                p.append(t)
            logits = model(torch.tensor(new)[:, None], cache, last_only=True)[:, -1]


def test_batched_greedy_equals_one_prompt_at_a_time(tok, model):
    engine = Engine(model, tok, max_batch=8)
    results = engine.generate(PROMPTS, SamplingParams(max_tokens=12, temperature=0))
    for prompt, (completion,) in zip(PROMPTS, results, strict=True):
        assert completion.token_ids == alone(model, tok, prompt, 12)
        assert completion.finish_reason == ("length" if len(completion.token_ids) == 12 else "stop")


def test_the_packed_head_follows_the_weights_as_they_change(tok):
    """An eager step of 16 rows takes the LM head's product with a packed copy of its weight:
    the same greedy tokens as one prompt at a time through F.linear, before and after a fused
    AdamW step (which moves no version counter), an in-place update and a new weight tensor."""
    from lmforge.engine import PACKED_HEAD_ROWS, _PackedHead

    used = []

    class Counted(_PackedHead):
        def __call__(self, h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
            used.append(change)
            return super().__call__(h, weight)

    model = tiny_model(tok)
    engine = Engine(model, tok, max_batch=PACKED_HEAD_ROWS)
    engine._packed_head = Counted()
    prompts = [PROMPTS[i % len(PROMPTS)][: 1 + i // len(PROMPTS)] for i in range(PACKED_HEAD_ROWS)]
    params = SamplingParams(max_tokens=6, temperature=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.5, fused=True)
    for change in (None, "fused AdamW", "in place", "new tensor"):
        if change == "fused AdamW":
            model(torch.tensor([PROMPTS[0]]))[0, -1].logsumexp(-1).backward()
            optimizer.step()
        with torch.no_grad():
            if change == "in place":
                model.embed_tokens.weight.mul_(-1.5)
            elif change == "new tensor":
                model.embed_tokens.weight = torch.nn.Parameter(torch.randn_like(model.embed_tokens.weight))
        results = engine.generate(prompts, params)
        for prompt, (completion,) in zip(prompts, results, strict=True):
            assert completion.token_ids == alone(model, tok, prompt, 6)
    assert set(used) == {None, "fused AdamW", "in place", "new tensor"}  # each generation used it


def test_without_onednn_packing_the_head_falls_back_to_the_plain_product(tok, monkeypatch):
    """A torch build whose oneDNN cannot pack the weight (some platforms): the first eager step
    of many rows says so, and every step takes F.linear - the same greedy tokens as alone."""
    from lmforge.engine import PACKED_HEAD_ROWS, _PackedHead

    def no_packing(*args, **kwargs):
        raise RuntimeError("no oneDNN linear in this build")

    monkeypatch.setattr(_PackedHead, "unsupported", False)
    monkeypatch.setattr(torch.ops.mkldnn, "_reorder_linear_weight", no_packing)
    model = tiny_model(tok)
    engine = Engine(model, tok, max_batch=PACKED_HEAD_ROWS)
    prompts = [PROMPTS[i % len(PROMPTS)][: 1 + i // len(PROMPTS)] for i in range(PACKED_HEAD_ROWS)]
    results = engine.generate(prompts, SamplingParams(max_tokens=4, temperature=0))
    assert _PackedHead.unsupported
    for prompt, (completion,) in zip(prompts, results, strict=True):
        assert completion.token_ids == alone(model, tok, prompt, 4)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_packed_prefill_fills_each_row_as_its_prompt_alone(tok, arch):
    # Truth: each prompt's full forward without a cache, and its keys/values from a plain KVCache.
    model = tiny_model(tok, arch)
    engine = Engine(model, tok, max_batch=6)
    requests = [engine.submit(p, SamplingParams()) for p in PROMPTS]
    with torch.no_grad():
        logits = engine._prefill(requests, 1)  # rows 1..4: not starting at row 0
        for row, prompt in enumerate(PROMPTS, start=1):
            torch.testing.assert_close(logits[row - 1], model(torch.tensor([prompt]))[0, -1], atol=1e-4, rtol=1e-4)
            plain = KVCache(model.cfg, 1, len(prompt), "cpu", torch.float32)
            model(torch.tensor([prompt]), plain)
            n = len(prompt)
            assert engine.cache.host_lengths[row] == n
            torch.testing.assert_close(engine.cache.k[:, row, :, :n], plain.k[:, 0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(engine.cache.v[:, row, :, :n], plain.v[:, 0], atol=1e-5, rtol=1e-5)
    assert engine.cache.k[:, 0].abs().sum() == 0 and engine.cache.k[:, 5].abs().sum() == 0  # other rows untouched


@pytest.mark.parametrize("rows", [3, BATCHED_DECODE_ATTENTION_ROWS + 1])
@pytest.mark.parametrize("masked", [True, False])
def test_decode_attention_is_sdpa(tok, model, masked, rows):
    # Truth: PyTorch's scaled_dot_product_attention with grouped key/value heads.
    torch.manual_seed(0)
    B, heads, groups, keys, d = rows, 6, 3, 11, 8
    q, k, v = torch.randn(B, heads, 1, d), torch.randn(B, groups, keys, d), torch.randn(B, groups, keys, d)
    mask = (torch.arange(keys) <= torch.arange(B)[:, None] % keys)[:, None, None] if masked else None
    cache = RaggedKVCache(model.cfg, 1, 1, "cpu", torch.float32)
    truth = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(cache.attend(q, k, v, mask), truth)
    low = cache.attend(q.bfloat16(), k.bfloat16(), v.bfloat16(), mask)  # a bf16 model's cache
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), truth, atol=3e-2, rtol=3e-2)


def test_the_context_ends_a_completion(tok, model):
    prompt = list(range(300, 340))  # 40 of the model's 48 positions
    (completion,), = Engine(model, tok).generate([prompt], SamplingParams(max_tokens=30, temperature=0))
    assert completion.token_ids == alone(model, tok, prompt, 30)
    assert len(completion.token_ids) <= 8


def test_a_request_joining_a_running_batch_gets_what_it_gets_alone(tok, model):
    engine = Engine(model, tok, max_batch=3)
    params = SamplingParams(max_tokens=10, temperature=0)
    first = [engine.submit(p, params) for p in PROMPTS[:2]]
    for _ in range(4):
        engine.step()
    late = [engine.submit(p, params) for p in PROMPTS[2:]]  # one fits now, one waits for a free row
    while engine.step():
        pass
    for prompt, request in zip(PROMPTS, first + late, strict=True):
        assert request.result()[0].token_ids == alone(model, tok, prompt, 10)


def test_n_samples_share_the_prefill_and_seeds_reproduce(tok, model):
    engine = Engine(model, tok, max_batch=8)
    sampled = SamplingParams(max_tokens=10, temperature=1.0, top_k=50, top_p=0.9, seed=5, n=3)
    once = engine.generate([PROMPTS[1]], sampled)[0]
    again = engine.generate([PROMPTS[1]], sampled)[0]
    assert [c.token_ids for c in once] == [c.token_ids for c in again]
    assert len({tuple(c.token_ids) for c in once}) > 1  # samples of one request differ
    # Sample i of seed s is the lone request of seed s + i: the fan-out copied the right cache.
    lone = engine.generate([PROMPTS[1]], SamplingParams(max_tokens=10, temperature=1.0, top_k=50,
                                                        top_p=0.9, seed=7))[0][0]
    assert once[2].token_ids == lone.token_ids
    greedy = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=8, temperature=0, n=2))[0]
    assert greedy[0].token_ids == greedy[1].token_ids == alone(model, tok, PROMPTS[0], 8)


def filtered_distribution(logits: list[float], temperature: float, top_k: int, top_p: float) -> list[float]:
    """The distribution a sampler must draw from, worked out plainly (exact softmax in float64,
    a ranked list, the nucleus by its definition): the independent truth for `sample_rows`."""
    scaled = [x / temperature for x in logits]
    ranked = sorted(range(len(logits)), key=lambda i: -scaled[i])
    kept = ranked[:top_k] if top_k else ranked
    top = max(scaled)
    weights = {i: math.exp(scaled[i] - top) for i in kept}
    total = sum(weights.values())
    nucleus, mass = [], 0.0
    for i in kept:  # the smallest prefix whose probability reaches top_p
        if mass >= top_p:
            break
        nucleus.append(i)
        mass += weights[i] / total
    z = sum(weights[i] for i in nucleus)
    return [weights[i] / z if i in nucleus else 0.0 for i in range(len(logits))]


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 1.0), (0.7, 4, 1.0), (1.3, 0, 0.8),
                                                       (0.9, 5, 0.6)])
def test_batched_sampler_draws_from_the_filtered_distribution(temperature, top_k, top_p):
    logits = torch.randn(12, generator=torch.Generator().manual_seed(1)) * 2
    truth = filtered_distribution(logits.tolist(), temperature, top_k, top_p)
    n = 4000  # evenly spaced uniforms: token i is drawn a fraction of times within 1/n of p_i
    tokens = sample_rows(logits.expand(n, -1), [temperature] * n, [top_k] * n, [top_p] * n,
                         [(j + 0.5) / n for j in range(n)])
    counts = torch.bincount(tokens, minlength=12) / n
    assert counts.tolist() == pytest.approx(truth, abs=2 / n)


def test_two_level_inverse_cdf_is_the_inverse_cdf():
    # 300 ids: five blocks of 64, the last one padded; ids of zero probability inside a block
    # and a whole block of them. Truth: the inverse CDF in float64, away from its steps (where
    # float32 rounding may decide either way); on and near the steps and at u -> 1, never an id
    # of probability zero.
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(300, generator=g) * 2
    logits[64:128] = float("-inf")
    logits[[5, 6, 200, 299]] = float("-inf")
    cdf = torch.softmax(logits.double(), dim=0).cumsum(0)
    n = 3000
    uniform = [(j + 0.5) / n for j in range(n)]
    tokens = sample_rows(logits.expand(n, -1), [1.0] * n, [0] * n, [1.0] * n, uniform).tolist()
    steps = cdf[torch.isfinite(logits)]
    for u, token in zip(uniform, tokens, strict=True):
        if (steps - u).abs().min() > 1e-5:
            assert token == int(torch.searchsorted(cdf, torch.tensor([u], dtype=torch.float64), right=True))
    edges = [float(c) for c in steps] + [1 - 1e-9, 0.0]
    drawn = sample_rows(logits.expand(len(edges), -1), [1.0] * len(edges), [0] * len(edges),
                        [1.0] * len(edges), edges)
    assert torch.isfinite(logits[drawn]).all()


def test_batched_sampler_rows_do_not_depend_on_each_other():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(6, 50, generator=g) * 3
    rules = [(1.0, 0, 1.0), (0.5, 3, 1.0), (1.5, 0, 0.7), (1.0, 10, 0.9), (0.8, 0, 1.0), (2.0, 49, 0.95)]
    uniform = torch.rand(6, generator=g).tolist()
    batched = sample_rows(logits, *zip(*rules, strict=True), uniform)
    for b, (t, k, p) in enumerate(rules):
        assert int(sample_rows(logits[b:b + 1], [t], [k], [p], [uniform[b]])[0]) == int(batched[b])
        assert truth_allows(logits[b].tolist(), t, k, p, int(batched[b]))
    broken = logits.clone()
    broken[2, 7] = float("nan")
    assert sample_rows(broken, *zip(*rules, strict=True), uniform).tolist()[2] == -1


@pytest.mark.parametrize("temperatures", [[1.0] * 6, [1.0, 0.5, 1.5, 1.0, 0.8, 2.0]])
def test_the_sampler_with_scratch_tensors_draws_what_it_draws_without(temperatures):
    """The engine hands the sampler two tensors to reuse (scaled logits, weights), dirty from
    the last step: the same tokens, each allowed by the row's distribution."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(6, 50, generator=g) * 3
    uniform = torch.rand(6, generator=g).tolist()
    no_filters = [0] * 6, [1.0] * 6  # top-k, top-p: what the scratch tensors serve
    scratch = (torch.full((6, 50), float("nan")), torch.full((6, 50), float("nan")))
    plain = sample_rows(logits, temperatures, *no_filters, uniform)
    assert sample_rows(logits, temperatures, *no_filters, uniform, scratch=scratch).tolist() == plain.tolist()
    assert all(truth_allows(logits[b].tolist(), t, 0, 1.0, int(plain[b])) for b, t in enumerate(temperatures))


def truth_allows(logits: list[float], temperature: float, top_k: int, top_p: float, token: int) -> bool:
    return filtered_distribution(logits, temperature, top_k, top_p)[token] > 0


def test_a_seeded_request_samples_the_same_in_any_batch(tok, model):
    # A sampled request's tokens depend on its own seed only: alone, or in a batch with other
    # sampled requests of other rules that join and leave around it.
    mine = SamplingParams(max_tokens=10, temperature=1.0, top_k=40, top_p=0.95, seed=11)
    engine = Engine(model, tok, max_batch=8)
    (lone,), = engine.generate([PROMPTS[2]], mine)
    others = [SamplingParams(max_tokens=3 + 2 * i, temperature=0.5 + i, seed=i, n=2) for i in range(3)]
    requests = [engine.submit(p, o) for p, o in zip(PROMPTS[:3], others, strict=False)]
    engine.step()
    request = engine.submit(PROMPTS[2], mine)  # joins the running batch
    while engine.step():
        pass
    assert request.result()[0].token_ids == lone.token_ids
    assert all(len(c.token_ids) > 0 for r in requests for c in r.result())


def test_logprobs_are_the_models(tok, model):
    params = SamplingParams(max_tokens=5, temperature=0, logprobs=True, top_logprobs=3)
    (completion,), = Engine(model, tok).generate([PROMPTS[3]], params)
    seq = list(PROMPTS[3])
    with torch.no_grad():
        for token, lp in zip(completion.token_ids, completion.logprobs, strict=True):
            expected = torch.log_softmax(model(torch.tensor([seq]))[0, -1, :tok.vocab_size].float(), -1)
            assert lp.token_id == token == int(expected.argmax())
            assert lp.logprob == pytest.approx(float(expected[token]), abs=1e-4)
            assert [t for t, _ in lp.top] == expected.topk(3).indices.tolist()
            seq.append(token)


def feed(engine: Engine, text: str, stop: tuple[str, ...] = (), stream: bool = True,
         max_tokens: int = 1000) -> tuple[list[str], str | None]:
    """Stream `text` one byte token at a time through the engine's text path; the pieces sent
    and the finish reason. Byte-level BPE: ids 0..255 are the single bytes."""
    request = engine.submit([1], SamplingParams(max_tokens=max_tokens, stop=stop), stream=stream)
    seq = _Sequence(request, 0)
    for byte in text.encode():
        engine._advance(seq, byte, None)
        if seq.finished:
            break
    else:
        engine._advance(seq, engine.tokenizer.special_tokens["<|end|>"], None)
    events = []
    while not request._events.empty():
        events.append(request._events.get())
    return [e.text for e in events], events[-1].finish_reason


@pytest.mark.parametrize("control", ["<|user|>", "<|system|>", "<|assistant|>", "<|end|>", "<|endoftext|>"])
def test_a_chat_control_token_ends_the_answer_and_is_never_text(tok, control):
    model = tiny_model(tok)
    words = tok.encode("ab cd")
    script = iter([*words, tok.special_tokens[control], *words])

    def head(h: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:  # the model writes the script, a token per forward
        logits = torch.zeros(*h.shape[:-1], model.cfg.vocab_size)
        logits[..., next(script)] = 100.0
        return logits

    model.head = head
    (answer,), = Engine(model, tok).generate([[5, 6]], SamplingParams(max_tokens=20, temperature=0))
    assert answer.text == "ab cd" and answer.token_ids == words and answer.finish_reason == "stop"


def test_multibyte_characters_stream_intact(tok, model):
    text = "héllo wörld, 世界 🙂!"
    pieces, reason = feed(Engine(model, tok), text)
    assert "".join(pieces) == text and reason == "stop"
    assert all(p.encode().decode() == p and "\ufffd" not in p for p in pieces)
    assert len([p for p in pieces if p]) > 1  # it did stream


@pytest.mark.parametrize("stream", [True, False])
@pytest.mark.parametrize("stop", [("lo wo",), ("xyz", "o w"), ("d!",)])
def test_stop_strings_spanning_tokens_end_the_text(tok, model, stop, stream):
    text = "hello world!"
    pieces, reason = feed(Engine(model, tok), text, stop, stream)
    first = min(i for i in (text.find(s) for s in stop) if i >= 0)
    assert "".join(pieces) == text[:first] and reason == "stop"


@pytest.mark.parametrize("stream", [True, False])
def test_a_stop_string_prefix_that_does_not_complete_is_sent(tok, model, stream):
    pieces, reason = feed(Engine(model, tok), "hello world", ("lo!",), stream)
    assert "".join(pieces) == "hello world" and reason == "stop"  # ended by <|end|>


@pytest.mark.parametrize("stop", [(), ("🙂",)])
def test_without_stream_the_text_comes_whole_in_one_event(tok, model, stop):
    text = "héllo wörld, 世界 🙂!"
    pieces, reason = feed(Engine(model, tok), text, stop, stream=False)
    assert pieces == [text[:text.find(stop[0])] if stop else text] and reason == "stop"
    # Cut after 14 bytes, inside the 3-byte 世: the text Python decodes from those bytes.
    pieces, reason = feed(Engine(model, tok), text, stop, stream=False, max_tokens=14)
    assert pieces == [text.encode()[:14].decode("utf-8", errors="replace")] and reason == "length"


def test_a_request_without_stream_completes_as_a_streamed_one(tok, model):
    """Sampled rows with log-probabilities, stop strings and the context's end: the same
    completions whether the text is decoded as it comes or once at the end."""
    engine = Engine(model, tok, max_batch=8)
    params = [SamplingParams(max_tokens=40, temperature=1.5, seed=3, n=2, logprobs=True, top_logprobs=2),
              SamplingParams(max_tokens=30, temperature=1.0, seed=4, stop=["e", "th"]),
              SamplingParams(max_tokens=6, temperature=0)]
    results = []
    for stream in (True, False):
        requests = [engine.submit(prompt, p, stream=stream) for prompt, p in zip(PROMPTS, params)]
        while engine.step():
            pass
        results.append([r.result() for r in requests])
    assert results[0] == results[1]
    assert {c.finish_reason for r in results[1] for c in r} >= {"stop", "length"}


def test_background_thread_serves_concurrent_requests(tok, model):
    engine = Engine(model, tok, max_batch=2)
    engine.start()
    try:
        params = SamplingParams(max_tokens=6, temperature=0)
        requests = [engine.submit(p, params) for p in PROMPTS]
        cancelled = engine.submit(PROMPTS[0], SamplingParams(max_tokens=40, temperature=0))
        cancelled.cancel()
        for prompt, request in zip(PROMPTS, requests, strict=True):
            assert request.result()[0].token_ids == alone(model, tok, prompt, 6)
    finally:
        engine.stop()


@pytest.mark.slow
def test_compiled_decode_steps_give_the_eager_tokens(tok, model):
    # Three requests of different lengths: the batch shrinks 3 -> 2 -> 1 as they finish, so the
    # compiled step runs padded (3 rows in the bucket of 4) and exact (2, 1), and rows move
    # between cache slots as others leave.
    engine = Engine(model, tok, max_batch=4, compile=True)
    assert engine.warm_up(sampled=False) > 0
    assert engine._compiled_buckets == {(b, kind) for b in (1, 2, 4) for kind in ("greedy", "run")}
    requests = [engine.submit(p, SamplingParams(max_tokens=6 + 5 * i, temperature=0))
                for i, p in enumerate(PROMPTS[:3])]
    with torch.compiler.set_stance("fail_on_recompile"):  # the warm-up compiled every step's graph
        while engine.step():
            pass
    for i, (prompt, request) in enumerate(zip(PROMPTS, requests, strict=False)):
        assert request.result()[0].token_ids == alone(model, tok, prompt, 6 + 5 * i)


@pytest.mark.slow
def test_compiled_engines_over_different_models_each_keep_their_graphs(tok, model):
    """Three compiled Engines over models of three widths in one process: 9 greedy graphs (3
    buckets each; one token a call, the run graphs are separate code objects made the same way).
    Dynamo keeps at most 8 per code object (its recompile limit) and runs past it eagerly, so the
    Engines must not share one: each still steps compiled after the others."""
    def wide(d_model: int) -> Transformer:
        cfg = load_config(overrides=[f"model.vocab_size={tok.vocab_size}", f"model.d_model={d_model}",
                                     "model.n_layers=1", "model.n_heads=4", "model.n_kv_heads=2",
                                     "model.max_seq_len=48"])
        return Transformer(cfg.model).eval()

    from torch._dynamo.utils import counters

    engines = [Engine(wide(d), tok, max_batch=4, compile=True, greedy_run=1) for d in (32, 48, 64)]
    before = counters["stats"]["unique_graphs"]
    for engine in engines:
        engine.warm_up(sampled=False)
    assert counters["stats"]["unique_graphs"] - before == 9  # past the limit: 8, the ninth eager
    params = SamplingParams(max_tokens=4, temperature=0)
    with torch.compiler.set_stance("fail_on_recompile"):  # and the warm-up's graphs serve the steps
        for engine in engines:
            engine.generate(PROMPTS[:3], params)


@pytest.mark.slow
def test_compiled_steps_over_bucketed_key_lengths_give_the_eager_tokens(tok):
    # A 160-token context: the compiled step attends over 64, 80, ... 160 keys as the rows
    # grow, in one graph per batch size (the key length is dynamic), and must give the tokens of
    # the eager engine, which attends over exactly the filled prefix.
    model = tiny_model(tok, max_seq_len=160)
    prompts = [list(range(300, 360)), PROMPTS[1], PROMPTS[2]]  # 60, 9 and 1 tokens
    params = SamplingParams(max_tokens=120, temperature=0)
    plain, engine = Engine(model, tok, max_batch=4), Engine(model, tok, max_batch=4, compile=True)
    plain.stop_ids = engine.stop_ids = set()  # every row runs to max_tokens or the context
    eager = [c[0].token_ids for c in plain.generate(prompts, params)]
    assert len(prompts[0]) + len(eager[0]) == 160  # the longest row reached the context's end
    engine.warm_up()
    with torch.compiler.set_stance("fail_on_recompile"):
        compiled = [c[0].token_ids for c in engine.generate(prompts, params)]
    assert compiled == eager


@pytest.mark.slow
def test_compiled_sampling_draws_the_eager_tokens(tok, model):
    # Rows sampled at a temperature are drawn inside the compiled graph, rows with top-k / top-p
    # by the eager sampler on the graph's logits, greedy rows take the graph's argmax: with the
    # same seeds every row must get the eager engine's tokens (the same rule on the same numbers).
    params = [SamplingParams(max_tokens=10, temperature=0.8, seed=1, n=3),
              SamplingParams(max_tokens=14, temperature=1.3, seed=2),
              SamplingParams(max_tokens=8, temperature=0),
              SamplingParams(max_tokens=12, temperature=1.0, top_k=20, top_p=0.9, seed=3)]
    plain, engine = Engine(model, tok, max_batch=8), Engine(model, tok, max_batch=8, compile=True)

    def run(e: Engine) -> list[list[list[int]]]:
        requests = [e.submit(p, sp) for p, sp in zip(PROMPTS, params, strict=True)]
        while e.step():
            pass
        return [[c.token_ids for c in r.result()] for r in requests]

    eager = run(plain)
    assert len({tuple(ids) for ids in eager[0]}) > 1  # the three samples differ: they were drawn
    assert run(engine) == eager
    assert (8, "sampled") in engine._compiled_buckets  # the six rows' steps ran the sampling graph


@pytest.mark.slow
@pytest.mark.parametrize("end", ["max_tokens", "stop_token", "stop_string", "calculator"])
def test_greedy_runs_end_each_row_where_single_steps_do(tok, model, end):
    """A compiled engine decodes greedy rows `greedy_run` (4) tokens a call; each row keeps its
    tokens up to the one that ends it or starts a calculator result. Every row's tokens, text and
    finish reason must be the eager engine's, which decodes one token a step; one request joins
    after the others have run a while. The trigger sits mid-run: the first token comes from the
    prefill, then runs give tokens 1-4, 5-8, ...; row 0's token 6 ends it or closes a tool call."""
    first = alone(model, tok, PROMPTS[0], 12)
    params = SamplingParams(max_tokens=12, temperature=0)
    plain, engine = Engine(model, tok, max_batch=4), Engine(model, tok, max_batch=4, compile=True)
    if end == "max_tokens":
        params = [SamplingParams(max_tokens=m, temperature=0) for m in (6, 9, 3, 13)]
    elif end == "stop_token":
        plain.stop_ids = engine.stop_ids = engine.stop_ids | {first[6]}
    elif end == "stop_string":
        params = SamplingParams(max_tokens=12, temperature=0, stop=[tok.decode(first[6:8])])
    else:  # the tokens at 1 and 6 open and close a tool call: its "result" (an error) is forced
        assert first[1] != first[6]
        plain.tool_ids = engine.tool_ids = (first[1], first[6])
    params = params if isinstance(params, list) else [params] * len(PROMPTS)

    def run(e: Engine) -> list[tuple[list[int], str, str | None]]:
        requests = [e.submit(p, sp) for p, sp in zip(PROMPTS[:3], params, strict=False)]
        for _ in range(2):
            e.step()
        requests.append(e.submit(PROMPTS[3], params[3]))
        while e.step():
            pass
        return [(c.token_ids, c.text, c.finish_reason) for r in requests for c in r.result()]

    eager = run(plain)
    assert run(engine) == eager
    assert (4, "run") in engine._compiled_buckets
    row = eager[0]
    if end == "stop_token":
        assert row[2] == "stop" and len(row[0]) <= 6
    elif end == "stop_string":
        assert row[2] == "stop" and tok.decode(first[6:8]) not in row[1]
    elif end == "calculator":
        assert "error" in row[1]  # the forced result of a call that is not arithmetic
    else:
        assert [r[0] for r in eager] == [alone(model, tok, p, m) for p, m in zip(PROMPTS, (6, 9, 3, 13), strict=True)]
