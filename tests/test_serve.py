"""`lmforge serve` against the official `openai` client: a real server process on 127.0.0.1.

Truths: the batch-1 `generate` path on the same checkpoint for the text, OpenAI's documented
shapes and status codes for the rest."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from chat_fixtures import tiny_chat_checkpoint  # noqa: E402

from lmforge.chat import render_prompt  # noqa: E402
from lmforge.engine import generate  # noqa: E402
from lmforge.serve import _Relay  # noqa: E402

KEY = "test-key-123"
CONTEXT = 4096


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    # 6 layers and a 4096 context: a full-length answer takes many seconds (see the queue test).
    return tiny_chat_checkpoint(tmp_path_factory.mktemp("serve"), n_layers=6, context=CONTEXT)


@pytest.fixture(scope="module")
def server(checkpoint):
    ckpt = checkpoint[0]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-m", "lmforge", "serve", "--checkpoint", str(ckpt),
                             "--port", str(port), "--api-key", KEY, "--max-concurrency", "2",
                             "--max-queue", "1", "--no-compile"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(f"{base}/health").status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.1)
        assert proc.poll() is None, proc.stdout.read()
    yield base
    proc.terminate()
    output = proc.communicate(timeout=30)[0]
    assert KEY not in output  # the key never reaches the logs
    assert "Traceback" not in output, output


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0)


def greedy_text(checkpoint, prompt_ids, max_tokens) -> str:
    _, tok, model = checkpoint
    out = generate(model, torch.tensor([prompt_ids]), max_tokens, temperature=0,
                   vocab_limit=tok.vocab_size)[0, len(prompt_ids):].tolist()
    return tok.decode(out)


MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello"}]


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == ["tiny-chat"]
    assert httpx.get(f"{server}/health").json()["status"] == "ok"


def test_chat_answer_is_the_models(checkpoint, client):
    tok = checkpoint[1]
    reply = client.chat.completions.create(model="tiny-chat", messages=MESSAGES, max_tokens=12,
                                           temperature=0)
    prompt = render_prompt(tok, MESSAGES)
    assert reply.choices[0].message.content == greedy_text(checkpoint, prompt, 12)
    assert reply.choices[0].finish_reason == "length"
    assert reply.object == "chat.completion" and reply.model == "tiny-chat"
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (len(prompt), 12)


def test_chat_streams_the_same_answer_then_usage(client):
    kwargs = dict(model="tiny-chat", messages=MESSAGES, max_completion_tokens=10, temperature=0)
    whole = client.chat.completions.create(**kwargs).choices[0].message.content
    chunks = list(client.chat.completions.create(**kwargs, stream=True,
                                                 stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10


def test_completions_with_a_stop_string(checkpoint, client):
    tok = checkpoint[1]
    full = greedy_text(checkpoint, tok.encode("def wrap"), 20)
    reply = client.completions.create(model="tiny-chat", prompt="def wrap", max_tokens=20, temperature=0)
    assert reply.choices[0].text == full and reply.choices[0].finish_reason == "length"
    stop = full[6:9]
    stopped = client.completions.create(model="tiny-chat", prompt="def wrap", max_tokens=20,
                                        temperature=0, stop=[stop])
    assert stopped.choices[0].text == full[:full.find(stop)]
    assert stopped.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="tiny-chat", prompt="def wrap", max_tokens=20,
                                         temperature=0, stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == full[:full.find(stop)]


def test_samples_seeds_and_logprobs(client):
    kwargs = dict(model="tiny-chat", messages=MESSAGES, max_tokens=8, temperature=1.0, n=2, seed=3,
                  logprobs=True, top_logprobs=2)
    first, again = client.chat.completions.create(**kwargs), client.chat.completions.create(**kwargs)
    assert [c.message.content for c in first.choices] == [c.message.content for c in again.choices]
    for choice in first.choices:
        tokens = choice.logprobs.content
        assert "".join(t.token for t in tokens) == choice.message.content or "\ufffd" in choice.message.content
        assert all(t.logprob <= 0 and len(t.top_logprobs) == 2 for t in tokens)
        assert all(t.top_logprobs[0].logprob >= t.logprob for t in tokens)


def error_of(call) -> tuple[int, dict]:
    with pytest.raises(openai.APIStatusError) as caught:
        call()
    return caught.value.status_code, caught.value.body


def test_bad_requests_are_400_in_openai_shape(client):
    status, body = error_of(lambda: client.chat.completions.create(
        model="tiny-chat", messages=MESSAGES, temperature=7))
    assert status == 400 and body["param"] == "temperature" and body["type"] == "invalid_request_error"
    assert set(body) == {"message", "type", "param", "code"}
    status, body = error_of(lambda: client.chat.completions.create(
        model="tiny-chat", messages=[{"role": "wizard", "content": "x"}]))
    assert status == 400 and body["param"] == "messages"
    status, body = error_of(lambda: client.completions.create(model="tiny-chat", prompt="hi", n=3))
    assert status == 400 and body["param"] == "n"


def test_context_overflow_names_both_numbers(checkpoint, client):
    prompt_tokens = len(checkpoint[1].encode("hello there"))
    status, body = error_of(lambda: client.completions.create(
        model="tiny-chat", prompt="hello there", max_tokens=CONTEXT))
    assert status == 400 and body["code"] == "context_length_exceeded"
    assert str(CONTEXT) in body["message"] and f"{prompt_tokens} tokens" in body["message"]


def test_auth_model_route_and_size_errors(server):
    wrong = openai.OpenAI(base_url=f"{server}/v1", api_key="nope", max_retries=0)
    status, body = error_of(lambda: wrong.models.list())
    assert status == 401 and body["type"] == "authentication_error"
    assert httpx.post(f"{server}/v1/completions", json={"prompt": "x"}).status_code == 401
    good = openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0)
    status, body = error_of(lambda: good.chat.completions.create(model="gpt-4", messages=MESSAGES))
    assert status == 404 and body["code"] == "model_not_found"
    headers = {"Authorization": f"Bearer {KEY}"}
    response = httpx.get(f"{server}/v1/nothing-here", headers=headers)
    assert response.status_code == 404 and "error" in response.json()
    big = httpx.post(f"{server}/v1/completions", headers=headers,
                     content=json.dumps({"model": "tiny-chat", "prompt": "x" * (2 << 20)}))
    assert big.status_code == 413 and big.json()["error"]["message"]
    broken = httpx.post(f"{server}/v1/completions", headers=headers, content=b"{not json")
    assert broken.status_code == 400


def test_a_full_queue_is_429_and_disconnects_free_their_rows(server):
    headers = {"Authorization": f"Bearer {KEY}"}
    long = {"model": "tiny-chat", "prompt": "x", "max_tokens": CONTEXT - 10, "temperature": 0,
            "stream": True}
    clients = [httpx.Client(timeout=30) for _ in range(3)]  # 2 rows generate, 1 request waits
    streams = [c.stream("POST", f"{server}/v1/completions", headers=headers, json=long) for c in clients]
    try:
        for s in streams:
            assert s.__enter__().status_code == 200
        # The official client sees OpenAI's own "busy" answer (and, with its retries off, raises).
        client = openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0)
        with pytest.raises(openai.RateLimitError) as busy:
            client.completions.create(model="tiny-chat", prompt="x", max_tokens=CONTEXT - 10)
        assert busy.value.status_code == 429
        assert busy.value.body["type"] == "rate_limit_error" and busy.value.body["code"] == "queue_full"
    finally:
        for s, c in zip(streams, clients, strict=True):
            s.__exit__(None, None, None)
            c.close()
    assert drained(server)  # the generations are cancelled, not run to the end
    ok = httpx.post(f"{server}/v1/completions", headers=headers,
                    json={"model": "tiny-chat", "prompt": "x", "max_tokens": 3})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3


def drained(server) -> bool:
    """Whether the engine is idle within ~2 s (a full answer of ~4000 tokens takes far longer)."""
    for _ in range(40):
        health = httpx.get(f"{server}/health").json()
        if health["running"] == health["waiting"] == 0:
            return True
        time.sleep(0.05)
    return False


def test_a_non_streaming_client_that_leaves_cancels_its_generation(server):
    long = {"model": "tiny-chat", "prompt": "x", "max_tokens": CONTEXT - 10, "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server}/v1/completions", headers={"Authorization": f"Bearer {KEY}"}, json=long,
                   timeout=1.0)
    assert drained(server)


# --------------------------------------------------------------------------------------------
# The web chat page at /


def test_the_page_is_served_without_a_key_or_external_assets(server):
    page = httpx.get(f"{server}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'const MODEL = "tiny-chat";' in page.text
    assert "http://" not in page.text and "https://" not in page.text and "//cdn" not in page.text


def chromium():
    """Playwright's API and Debian's Chromium, or a skip saying which is missing."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    path = Path("/usr/bin/chromium")
    if not path.exists():
        pytest.skip("no /usr/bin/chromium (apt-get install chromium)")
    return sync_api, str(path)


def test_the_page_chats_streams_and_stops_in_a_browser(server, tmp_path):
    sync_api, path = chromium()
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=path, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(f"{server}/")
            page.fill("#key", KEY)
            page.fill("#temperature", "0")
            page.fill("#max-tokens", "8")
            page.fill("#input", "Hello there")
            page.press("#input", "Enter")
            page.wait_for_function("document.querySelector('#send').disabled === false "
                                   "&& document.querySelectorAll('.msg.assistant').length === 1",
                                   timeout=60_000)
            assert page.inner_text(".msg.user") == "Hello there"
            assert page.inner_text(".msg.assistant").strip()  # the answer arrived
            assert page.locator(".msg.error").count() == 0
            page.screenshot(path=str(tmp_path / "chat.png"))
            # A long answer, stopped while it streams: the button frees the server's rows.
            page.fill("#max-tokens", "4000")
            page.fill("#input", "Talk for a long time")
            page.press("#input", "Enter")
            page.wait_for_function("document.querySelectorAll('.msg.assistant')[1].textContent.length > 0",
                                   timeout=60_000)
            page.click("#stop")
            page.wait_for_function("document.querySelector('#send').disabled === false", timeout=10_000)
            assert page.locator(".msg.assistant").nth(1).get_attribute("data-stopped") == "1"
            # An error is shown to the user: a wrong key.
            page.fill("#key", "wrong")
            page.fill("#input", "again")
            page.press("#input", "Enter")
            page.wait_for_selector(".msg.error", timeout=30_000)
            assert "API key" in page.inner_text(".msg.error")
            page.click("#new")
            assert page.locator(".msg").count() == 0
        finally:
            browser.close()
    assert drained(server)


def test_waiting_events_of_one_sequence_stream_as_one_chunk():
    from collections import deque

    from lmforge.engine import Event
    from lmforge.serve import _coalesce

    error = RuntimeError("boom")
    backlog = deque([Event(0, "a", [1], []), Event(0, "b", [2], []), Event(1, "x", [9], []),
                     Event(1, "y", [8], [], "stop"), Event(1, "z", [7], []), error])
    merged = [_coalesce(backlog) for _ in range(4)]
    assert [(e.index, e.text, e.token_ids, e.finish_reason) for e in merged[:3]] == [
        (0, "ab", [1, 2], None), (1, "xy", [9, 8], "stop"), (1, "z", [7], None)]
    assert merged[3] is error and not backlog


def test_the_relay_delivers_every_event_in_order_from_another_thread():
    # Truth: what the sending thread sent, per queue. The sender and the loop race on the relay's
    # one pending wake-up; no event may be lost or reordered, also when sends interleave with drains.
    import asyncio
    import threading

    async def run() -> list[list[int]]:
        relay = _Relay(asyncio.get_running_loop())
        queues = [asyncio.Queue() for _ in range(3)]
        senders = [relay.sender(q) for q in queues]

        def engine() -> None:
            for step in range(2000):
                for send in senders:
                    send(step)
                if step % 7 == 0:
                    time.sleep(0)  # let the loop drain part way through

        thread = threading.Thread(target=engine)
        thread.start()

        async def collect() -> list[list[int]]:
            return [[await q.get() for _ in range(2000)] for q in queues]

        got = await asyncio.wait_for(collect(), timeout=60)  # a lost event fails, not hangs
        thread.join()
        assert all(q.empty() for q in queues)
        return got

    assert asyncio.run(run()) == [list(range(2000))] * 3
