"""Load on `lmforge serve`: concurrent streaming clients against one server process.

A random model of `--preset` with a small chat tokenizer is saved and served
(`--max-concurrency 16`). Each client streams one greedy chat completion of `--tokens` tokens
(a different prompt per client). Reported per load (1, 16 and `--clients` clients at once):
aggregate generated tokens/s (usage counts / wall time), its ratio to one client's rate (the
median over the `--clients` reference requests sent one at a time), the median time to first
token, and whether every answer equals the one its prompt gets alone (greedy, so batching must
not change it).

    OMP_NUM_THREADS=1 python benchmarks/bench_serve.py --preset tiny --clients 64
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import httpx
import torch

from lmforge.checkpoint import save_model
from lmforge.config import load_config
from lmforge.engine import STOP_TOKENS
from lmforge.model import Transformer
from lmforge.tokenizer import train_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def make_checkpoint(root: Path, preset: str) -> Path:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    tok = train_tokenizer([(stdlib / "textwrap.py").read_text(encoding="utf-8")], vocab_size=600, workers=1)
    tok.save(root / "tok")
    cfg = load_config(preset=preset, overrides=[f"model.vocab_size={tok.vocab_size}"])
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    with torch.no_grad():  # a zero (tied) embedding: a random model never stops early, every answer is full
        for token in STOP_TOKENS:
            model.embed_tokens.weight[tok.special_tokens[token]] = 0
    return save_model(model, cfg, root / "bench", tokenizer_dir=root / "tok")


async def one(client: httpx.AsyncClient, url: str, prompt: str, tokens: int) -> tuple[str, int, float]:
    """(answer, generated tokens, seconds to the first text) of one streamed chat completion."""
    body = {"model": "bench", "messages": [{"role": "user", "content": prompt}], "max_tokens": tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    start, first, text, usage = time.perf_counter(), None, [], 0
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]["completion_tokens"]
            for choice in chunk["choices"]:
                piece = choice["delta"].get("content")
                if piece:
                    first = first or time.perf_counter() - start
                    text.append(piece)
    return "".join(text), usage, first or 0.0


async def load(url: str, prompts: list[str], tokens: int) -> tuple[list[str], float, float]:
    """Every prompt at once: answers, aggregate tokens/s, median time to first token."""
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=len(prompts))) as client:
        start = time.perf_counter()
        results = await asyncio.gather(*(one(client, url, p, tokens) for p in prompts))
        wall = time.perf_counter() - start
    return ([r[0] for r in results], sum(r[1] for r in results) / wall,
            statistics.median(r[2] for r in results))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=64, help="max_tokens of each answer")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="the server's --compile (default: the server's own default)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp, socket.socket() as s:
        ckpt = make_checkpoint(Path(tmp), args.preset)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        server = subprocess.Popen([sys.executable, "-m", "lmforge", "serve", "--checkpoint", str(ckpt),
                                   "--port", str(port), "--max-concurrency", "16", "--max-queue",
                                   str(args.clients),
                                   *({True: ["--compile"], False: ["--no-compile"]}.get(args.compile, []))],
                                  env=env)
        url = f"http://127.0.0.1:{port}"
        try:
            for _ in range(6000):  # a compiling server starts after its warm-up
                try:
                    httpx.get(f"{url}/health")
                    break
                except httpx.HTTPError:
                    time.sleep(0.1)
            prompts = [f"Question {i}: what is {i} + {i * 7 % 13}?" for i in range(args.clients)]
            alone, rates = {}, []
            for p in prompts:  # the reference answers, one request at a time
                answers, rate, _ = asyncio.run(load(url, [p], args.tokens))
                alone[p] = answers[0]
                rates.append(rate)
            # One client's rate: the median of these sequential requests, not one 64-token
            # request (that one moved 3x between runs on the shared machine).
            single = statistics.median(rates)
            print(f"preset {args.preset}, {args.tokens} tokens per answer, --max-concurrency 16, "
                  f"compile {args.compile}, torch threads {os.environ.get('OMP_NUM_THREADS', 'default')}")
            print(f"  {'clients':>8}{'tok/s':>10}{'vs 1':>8}{'TTFT median':>14}  answers as alone")
            print(f"  one client, median of {len(rates)} requests in a row: {single:,.0f} tok/s")
            for n in (1, 16, args.clients):
                answers, rate, ttft = asyncio.run(load(url, prompts[:n], args.tokens))
                correct = sum(a == alone[p] for a, p in zip(answers, prompts, strict=False))
                print(f"  {n:>8}{rate:>10,.0f}{rate / single:>7.2f}x{ttft * 1000:>12,.0f}ms  {correct}/{n}")
        finally:
            server.terminate()
            server.wait(timeout=30)


if __name__ == "__main__":
    main()
