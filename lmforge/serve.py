"""`lmforge serve`: an OpenAI-compatible HTTP server over the engine (FastAPI on uvicorn).

    GET  /                       the web chat page (lmforge/web/chat.html)
    GET  /health                 {"status": "ok", "running": rows generating, "waiting": queued}
    GET  /v1/models              the one model, named after its checkpoint directory
    POST /v1/chat/completions    messages -> chat.completion (or SSE chat.completion.chunk)
    POST /v1/completions         prompt -> text_completion (or SSE chunks)

Every request goes to one `Engine` running on a background thread; its events come back to the
event loop through an asyncio queue. At most `max_concurrency` sequences generate at once (the
engine's rows); up to `max_queue` more requests wait; beyond that a request gets 429. A client that
disconnects cancels its request, which frees its rows at the engine's next step.

Errors have OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, and status 400
(invalid field, prompt + max_tokens over the context), 401 (API key, compared in constant time and
never logged), 404 (model or route), 413 (body over 1 MiB) or 429 (queue full).
"""

# No `from __future__ import annotations`: FastAPI reads the routes' annotations at runtime, and
# `Request` is imported inside `create_app` (the module imports without FastAPI installed).
import argparse
import asyncio
import contextlib
import hmac
import json
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge.errors import UserError

MAX_BODY_BYTES = 1 << 20
MAX_STOPS = 4
MAX_TOP_LOGPROBS = 20


class ApiError(Exception):
    """An error answered to the client in OpenAI's shape."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             413: "invalid_request_error", 429: "rate_limit_error"}

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}


# --------------------------------------------------------------------------------------------
# Request fields


@dataclass
class Parsed:
    prompt_ids: list[int]
    params: Any  # engine.SamplingParams
    stream: bool
    include_usage: bool
    top_logprobs: int | None  # None: no logprobs asked


def _number(body: dict, name: str, default: float | None, lo: float, hi: float,
            integer: bool = False) -> Any:
    value = body.get(name)
    if value is None:
        return default
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not lo <= value <= hi:
        kind = "an integer" if integer else "a number"
        raise ApiError(400, f"'{name}' must be {kind} from {lo:g} to {hi:g}, got {value!r}", name)
    return value


def parse_request(body: Any, chat: bool, tokenizer, context: int, max_n: int) -> Parsed:
    """The prompt's token ids and the sampling parameters of a request body; ApiError 400 naming
    the field on anything invalid."""
    from lmforge.chat import render_prompt
    from lmforge.engine import SamplingParams

    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list):
            raise ApiError(400, "'messages' must be a list of {role, content} objects", "messages")
        try:
            prompt_ids = render_prompt(tokenizer, [_flatten(m) for m in messages])
        except UserError as error:
            raise ApiError(400, f"'messages': {error}", "messages") from None
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, str):
            prompt_ids = tokenizer.encode(prompt) or [tokenizer.eot_id]
        elif (isinstance(prompt, list) and prompt
              and all(isinstance(t, int) and 0 <= t < tokenizer.vocab_size for t in prompt)):
            prompt_ids = list(prompt)
        else:
            raise ApiError(400, "'prompt' must be a string or a list of token ids", "prompt")
    room = context - len(prompt_ids)
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    name = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    if max_tokens is None:
        max_tokens = max(room, 1)
    elif isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ApiError(400, f"'{name}' must be a positive integer, got {max_tokens!r}", name)
    if len(prompt_ids) + max_tokens > context:
        raise ApiError(400, f"this model's context is {context} tokens; the prompt has "
                            f"{len(prompt_ids)} tokens and {name} is {max_tokens} "
                            f"({len(prompt_ids) + max_tokens} in all)", name, "context_length_exceeded")
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop
    if stop is not None and not (isinstance(stop, list) and len(stop) <= MAX_STOPS
                                 and all(isinstance(s, str) and s for s in stop)):
        raise ApiError(400, f"'stop' must be a string or a list of up to {MAX_STOPS} non-empty strings", "stop")
    top_logprobs = _logprobs(body, chat)
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise ApiError(400, "'stream_options' must be an object", "stream_options")
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be true or false", "stream")
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, 0, 2),
        top_p=_number(body, "top_p", None, 0, 1) or None,
        top_k=_number(body, "top_k", None, 0, tokenizer.vocab_size, integer=True) or None,
        seed=_number(body, "seed", None, -(2**63), 2**63 - 1, integer=True),
        stop=tuple(stop or ()),
        n=_number(body, "n", 1, 1, max_n, integer=True),
        logprobs=top_logprobs is not None,
        top_logprobs=top_logprobs or 0,
    )
    return Parsed(prompt_ids, params, stream, bool(stream_options.get("include_usage")), top_logprobs)


def _flatten(message: Any) -> Any:
    """A message whose content is OpenAI's list of text parts, as one string."""
    if isinstance(message, dict) and isinstance(message.get("content"), list):
        parts = message["content"]
        if all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
               for p in parts):
            return {**message, "content": "".join(p["text"] for p in parts)}
    return message


def _logprobs(body: dict, chat: bool) -> int | None:
    """How many alternatives per token to report, or None for no log-probabilities: chat has
    `logprobs: bool` and `top_logprobs: int`, completions `logprobs: int`."""
    if chat:
        wanted = body.get("logprobs") or False
        if not isinstance(wanted, bool):
            raise ApiError(400, "'logprobs' must be true or false", "logprobs")
        top = _number(body, "top_logprobs", 0, 0, MAX_TOP_LOGPROBS, integer=True)
        if top and not wanted:
            raise ApiError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs")
        return top if wanted else None
    return _number(body, "logprobs", None, 0, 5, integer=True)  # the legacy API allows 5


# --------------------------------------------------------------------------------------------
# Responses


def _chat_logprobs(tokenizer, logprobs: list) -> dict:
    def entry(token_id: int, logprob: float) -> dict:
        data = tokenizer.decode_bytes([token_id])
        return {"token": data.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(data)}

    return {"content": [{**entry(lp.token_id, lp.logprob),
                         "top_logprobs": [entry(t, v) for t, v in lp.top]} for lp in logprobs]}


def _completion_logprobs(tokenizer, logprobs: list, offset: int = 0) -> dict:
    def text(token_id: int) -> str:
        return tokenizer.decode_bytes([token_id]).decode("utf-8", errors="replace")

    offsets, position = [], offset
    for lp in logprobs:
        offsets.append(position)
        position += len(text(lp.token_id))
    return {"tokens": [text(lp.token_id) for lp in logprobs],
            "token_logprobs": [lp.logprob for lp in logprobs],
            "top_logprobs": [{text(t): v for t, v in lp.top} for lp in logprobs],
            "text_offset": offsets}


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


# --------------------------------------------------------------------------------------------
# The application


class _Relay:
    """Hands the engine thread's events to the event loop's per-request queues with one wake-up
    of the loop for all the events waiting, not one per event: a step of 16 rows makes 16 events,
    and each `call_soon_threadsafe` writes to the loop's wake-up pipe."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.pending: deque[tuple[asyncio.Queue, Any]] = deque()
        self.scheduled = False

    def sender(self, events: asyncio.Queue) -> Callable[[Any], None]:
        def send(event: Any) -> None:  # on the engine's thread
            self.pending.append((events, event))
            if not self.scheduled:
                self.scheduled = True
                self.loop.call_soon_threadsafe(self._drain)
        return send

    def _drain(self) -> None:  # on the loop; cleared first, so an event added meanwhile wakes it again
        self.scheduled = False
        while self.pending:
            events, event = self.pending.popleft()
            events.put_nowait(event)


def create_app(engine, model_name: str, api_key: str | None = None, max_queue: int = 64):
    """The FastAPI application serving `engine` (started here on its background thread)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException

    tokenizer, context = engine.tokenizer, engine.cfg.max_seq_len
    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="lmforge", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    in_flight = 0  # requests submitted and not yet finished or cancelled
    relay: _Relay | None = None

    @app.exception_handler(ApiError)
    async def api_error(_: Request, error: ApiError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, error: HTTPException) -> JSONResponse:
        message = "unknown route" if error.status_code == 404 else str(error.detail)
        return JSONResponse(ApiError(error.status_code, message).body(), status_code=error.status_code)

    app.add_middleware(Guard, api_key=api_key)

    @app.get("/", response_class=HTMLResponse)
    async def page() -> str:
        return chat_page(model_name)

    @app.get("/health")
    async def health() -> dict:
        running, waiting = engine.load()
        return {"status": "ok", "running": running, "waiting": waiting}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [_model_card(model_name)]}

    @app.get("/v1/models/{name}")
    async def model(name: str) -> dict:
        if name != model_name:
            raise ApiError(404, f"unknown model {name!r}; this server has {model_name!r}", "model",
                           "model_not_found")
        return _model_card(model_name)

    async def read(request: Request, chat: bool) -> Parsed:
        body = await request.body()
        if len(body) > MAX_BODY_BYTES:
            raise ApiError(413, f"request body over {MAX_BODY_BYTES} bytes")
        try:
            data = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ApiError(400, "the request body is not valid JSON") from None
        if isinstance(data, dict) and data.get("model") not in (None, model_name):
            raise ApiError(404, f"unknown model {data.get('model')!r}; this server has {model_name!r}",
                           "model", "model_not_found")
        return parse_request(data, chat, tokenizer, context, engine.max_batch)

    def submit(parsed: Parsed) -> tuple[Any, asyncio.Queue]:
        nonlocal in_flight, relay
        if in_flight >= engine.max_batch + max_queue:
            raise ApiError(429, f"the server is busy: {in_flight} requests running or queued; retry later",
                           code="queue_full")
        loop = asyncio.get_running_loop()
        if relay is None or relay.loop is not loop:
            relay = _Relay(loop)
        events: asyncio.Queue = asyncio.Queue()
        handle = engine.submit(parsed.prompt_ids, parsed.params, on_event=relay.sender(events))
        in_flight += 1
        return handle, events

    def finish(handle: Any) -> None:
        nonlocal in_flight
        handle.cancel()  # a no-op once it is done; frees the rows of one cut short
        in_flight -= 1

    async def collect(request: Request, handle: Any, events: asyncio.Queue, n: int) -> list[list]:
        """Every event of a non-streamed request; cancels it when the client goes away."""
        parts: list[list] = [[] for _ in range(n)]
        running = n
        loop = asyncio.get_running_loop()
        checked = loop.time()
        while running:
            try:
                event = await asyncio.wait_for(events.get(), timeout=0.25)
            except asyncio.TimeoutError:
                event = None
            # Look for a disconnect every 0.25 s, also while events keep coming.
            if loop.time() - checked >= 0.25:
                checked = loop.time()
                if await request.is_disconnected():  # nobody reads the answer; `finish` cancels
                    raise ApiError(400, "the client disconnected")
            if event is None:
                continue
            if isinstance(event, BaseException):
                raise event
            parts[event.index].append(event)
            running -= event.finish_reason is not None
        return parts

    async def respond(request: Request, chat: bool) -> Any:
        parsed = await read(request, chat)
        handle, events = submit(parsed)
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        created = int(time.time())
        if parsed.stream:
            chunks = _stream(handle, events, parsed, chat, ident, created)
            return StreamingResponse(_guarded(chunks, lambda: finish(handle)),
                                     media_type="text/event-stream")
        try:
            parts = await collect(request, handle, events, parsed.params.n)
        finally:
            finish(handle)
        choices, generated = [], 0
        for index, events_of in enumerate(parts):
            text = "".join(e.text for e in events_of)
            logprobs = [lp for e in events_of for lp in e.logprobs]
            generated += sum(len(e.token_ids) for e in events_of)
            lp_out = None
            if parsed.top_logprobs is not None:
                lp_out = (_chat_logprobs(tokenizer, logprobs) if chat
                          else _completion_logprobs(tokenizer, logprobs))
            choice = {"index": index, "logprobs": lp_out, "finish_reason": events_of[-1].finish_reason}
            choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
            choices.append(choice)
        return {"id": ident, "object": "chat.completion" if chat else "text_completion",
                "created": created, "model": model_name, "choices": choices,
                "usage": _usage(len(parsed.prompt_ids), generated)}

    async def _stream(handle: Any, events: asyncio.Queue, parsed: Parsed, chat: bool, ident: str,
                      created: int) -> AsyncIterator[str]:
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(choices: list, **extra: Any) -> str:
            data = {"id": ident, "object": kind, "created": created, "model": model_name,
                    "choices": choices, **extra}
            return f"data: {json.dumps(data)}\n\n"

        if chat:  # the role comes first, as OpenAI sends it
            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None} for i in range(parsed.params.n)])
        running, generated = parsed.params.n, 0
        offsets = [0] * parsed.params.n
        backlog: deque = deque()  # events taken off the queue, not yet sent
        while running:
            if not backlog:
                backlog.append(await events.get())
                while not events.empty():
                    backlog.append(events.get_nowait())
            event = _coalesce(backlog)
            if isinstance(event, BaseException):
                raise event
            running -= event.finish_reason is not None
            generated += len(event.token_ids)
            lp_out = None
            if parsed.top_logprobs is not None:
                lp_out = (_chat_logprobs(tokenizer, event.logprobs) if chat
                          else _completion_logprobs(tokenizer, event.logprobs, offsets[event.index]))
            offsets[event.index] += len(event.text)
            choice = {"index": event.index, "logprobs": lp_out, "finish_reason": event.finish_reason}
            choice.update({"delta": {"content": event.text} if event.text else {}} if chat
                          else {"text": event.text})
            yield chunk([choice], **({"usage": None} if parsed.include_usage else {}))
        if parsed.include_usage:
            yield chunk([], usage=_usage(len(parsed.prompt_ids), generated))
        yield "data: [DONE]\n\n"

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        return await respond(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await respond(request, chat=False)

    return app


class Guard:
    """Body size and API key, checked before any route reads the body. Plain ASGI (not
    `@app.middleware`, whose wrapped `receive` hides a client's disconnect from the routes)."""

    def __init__(self, app: Any, api_key: str | None) -> None:
        self.app, self.api_key = app, api_key

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        from fastapi.responses import JSONResponse

        error = None
        if scope["type"] == "http":
            headers = dict(scope["headers"])
            length = headers.get(b"content-length", b"0").decode("latin-1")
            if not length.isdigit() or int(length) > MAX_BODY_BYTES:
                error = ApiError(413, f"request body over {MAX_BODY_BYTES} bytes")
            elif self.api_key is not None and scope["path"].startswith("/v1/"):
                given = headers.get(b"authorization", b"")
                if not hmac.compare_digest(given, f"Bearer {self.api_key}".encode()):
                    error = ApiError(401, "missing or invalid API key (send 'Authorization: Bearer KEY')",
                                     code="invalid_api_key")
        if error is None:
            await self.app(scope, receive, send)
        else:
            await JSONResponse(error.body(), error.status)(scope, receive, send)


def _coalesce(backlog: deque) -> Any:
    """The first waiting event joined with the events of the same sequence right behind it: when
    the server falls behind the engine (many clients on few cores), one chunk then carries
    several tokens instead of one chunk each that the server and its client would serialise and
    parse (OpenAI's own streams do the same). Stops at an error or another sequence's event."""
    from lmforge.engine import Event

    event = backlog.popleft()
    while (isinstance(event, Event) and event.finish_reason is None and backlog
           and isinstance(backlog[0], Event) and backlog[0].index == event.index):
        nxt = backlog.popleft()
        event = Event(event.index, event.text + nxt.text, event.token_ids + nxt.token_ids,
                      event.logprobs + nxt.logprobs, nxt.finish_reason)
    return event


async def _guarded(chunks: AsyncIterator[str], done: Callable[[], None]) -> AsyncIterator[str]:
    """The chunks of a stream; `done` runs however it ends (finished, failed or the client
    disconnected, which cancels this generator)."""
    try:
        async for piece in chunks:
            yield piece
    finally:
        done()


def chat_page(model_name: str) -> str:
    """The web chat page (lmforge/web/chat.html) for this model: static, no external assets."""
    page = (Path(__file__).parent / "web" / "chat.html").read_text(encoding="utf-8")
    # JSON is a JavaScript literal; "</" escaped so a name cannot close the <script>.
    return page.replace("__MODEL__", json.dumps(model_name).replace("</", "<\\/"))


def _model_card(name: str) -> dict:
    return {"id": name, "object": "model", "created": 0, "owned_by": "lmforge"}


# --------------------------------------------------------------------------------------------
# The command


def serve_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, metavar="DIR",
                        help="a checkpoint directory (with its tokenizer/), or a run directory")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", metavar="KEY", help="require 'Authorization: Bearer KEY' on /v1/*")
    parser.add_argument("--max-concurrency", type=int, default=16, metavar="N",
                        help="sequences generated at once (the engine's batch)")
    parser.add_argument("--max-queue", type=int, default=64, metavar="N",
                        help="requests that may wait for a free slot; more get 429")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="compile the decode step of up to 16 rows (default: on CPU; tens of "
                             "seconds at startup the first time, a few once cached)")


def serve_command(args: argparse.Namespace) -> int:
    try:
        import uvicorn
    except ImportError:
        raise UserError("lmforge serve needs FastAPI and uvicorn: pip install 'lmforge[serve]'") from None
    if args.max_concurrency < 1 or args.max_queue < 0 or not 0 < args.port < 65536:
        raise UserError("--max-concurrency must be >= 1, --max-queue >= 0 and --port in 1..65535")
    from lmforge.engine import load_engine

    compile = args.compile if args.compile is not None else args.device == "cpu"
    engine, name = load_engine(args.checkpoint, args.device, args.max_concurrency, compile)
    if engine.compile_max_batch:
        print("compiling the decode step...", flush=True)
        print(f"compiled the decode step for batches up to {engine.compile_max_batch} in "
              f"{engine.warm_up():.1f} s", flush=True)
    app = create_app(engine, name, args.api_key, args.max_queue)
    print(f"serving {name} on http://{args.host}:{args.port}/v1", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
