"""The HTTP side of `zhlora serve` (zhlora/server.py): OpenAI-shaped routes and the chat page.

    POST /v1/chat/completions   {"model", "messages", "max_tokens", "temperature", "top_p", "stop",
                                 "seed", "stream"}: one answer, whole or as SSE chunks
    GET  /v1/models             "base", "default" and each --adapters name
    GET  /health                {"status": "ok", "pending": jobs queued or running}
    GET  /                      the chat page (zhlora/web/)

Every refusal is `{"error": {"message", "type", "param", "code"}}`, as OpenAI writes it:
400 for a bad body (malformed JSON, not `Content-Type: application/json`, wrong types,
values out of range: FastAPI's 422 is turned into 400; "5" is not 5 here), 401 for a
missing or wrong API key, 404 for an unknown model or route, 411 for a chunked body (its
size is unknown until read; OpenAI clients send Content-Length), 413 when Content-Length
is over 12 x --max_input_chars + 4 MiB, 500 if generation itself fails (in a stream, where
the status is already sent: an error event, then [DONE]). Streams end with `data: [DONE]`;
with stream_options.include_usage a last chunk carries `usage`. Requiring JSON also keeps
web pages on other sites from posting to a local server: a browser asks first (CORS
preflight) before sending that type, and no CORS is allowed here.

The request schema and the error shape are in serving/schema.py; the model and its worker
thread in serving/engine.py.
"""
from __future__ import annotations

import asyncio
import json
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

from zhlora.formatting import encode_prompt
from zhlora.serving.engine import DONE, Engine, Job
from zhlora.serving.schema import APIError, ChatRequest, validation_error

WEB_DIR = Path(__file__).parent.parent / "web"  # zhlora/web/
DEFAULT_MAX_TOKENS = 256  # as the demo; capped by --max_tokens_limit and the model's context
# The page loads only its own files: nothing is fetched from anywhere else.
PAGE_POLICY = "default-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'"


@dataclass
class Limits:
    max_tokens: int = 1024  # --max_tokens_limit
    max_input_chars: int = 20000  # --max_input_chars, summed over all messages

    @property
    def max_body_bytes(self) -> int:
        # A character is at most 12 bytes of JSON (an escaped surrogate pair); the 4 MiB of slack lets
        # a too-long message (1 MB, say) reach the clearer 400 "too many characters" below.
        return 12 * self.max_input_chars + 4 * 2**20


class Guard:
    """ASGI middleware run before any route: API key and body size for /v1/ (pure ASGI, so streams stay
    cancellable on disconnect)."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int):
        self.app, self.api_key, self.max_body_bytes = app, api_key, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            headers = dict(scope["headers"])
            given = headers.get(b"authorization", b"").decode("latin-1")
            if self.api_key and not secrets.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
                error = APIError(401, "Incorrect or missing API key: send `Authorization: Bearer KEY`, the key given "
                                 "to zhlora serve --api_key.", code="invalid_api_key")
                return await error.response()(scope, receive, send)
            if b"transfer-encoding" in headers:
                # A chunked body has no size to check, and h11 lets Transfer-Encoding win over a Content-Length
                # sent with it: without this, a 1 GB body would pass the check below and be read into memory.
                error = APIError(411, "Send the body with a Content-Length header (Transfer-Encoding is not "
                                 "accepted).", code="length_required")
                return await error.response()(scope, receive, send)
            size = headers.get(b"content-length", b"0")  # no header and no Transfer-Encoding: no body
            if not size.isdigit() or int(size) > self.max_body_bytes:
                error = APIError(413, f"Request body too large: at most {self.max_body_bytes} bytes.",
                                 code="request_too_large")
                return await error.response()(scope, receive, send)
        await self.app(scope, receive, send)


# ---- answering -----------------------------------------------------------------------


class StopCutter:
    """Cuts streamed text at the first stop string, holding back any tail that could start one."""

    def __init__(self, stops: list[str]):
        self.stops, self.held, self.hit = stops, "", False

    def feed(self, piece: str) -> str:
        text, self.held = self.held + piece, ""
        found = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if found:
            self.hit = True
            return text[:min(found)]
        keep = max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        self.held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep]


async def _pieces(engine: Engine, job: Job, queue: asyncio.Queue, stops: list[str]):
    """Yield the answer's text as it is generated: leading whitespace dropped, cut at a stop string.

    Cancels the job when it stops early (stop string) or the caller goes away (GeneratorExit or
    CancelledError reach the `finally` at the `await`).
    """
    cutter, started = StopCutter(stops), False
    engine.submit(job)
    try:
        while (item := await queue.get()) is not DONE:
            if not started:
                item = item.lstrip()  # answers often open with a newline
                started = bool(item)
            text = cutter.feed(item) if item else ""
            if text:
                yield text
            if cutter.hit:
                job.cancel.set()
                break
        else:
            if job.error is not None:
                raise APIError(500, f"Generation failed: {type(job.error).__name__}: {job.error}",
                               kind="server_error", code="generation_failed")
            if cutter.held:
                yield cutter.held
    finally:
        job.cancel.set()  # no-op when it finished; frees the worker within one token otherwise
    job.finish = "stop" if cutter.hit or job.ended_by_eos else "length"


def _job(engine: Engine, limits: Limits, body: ChatRequest) -> tuple[Job, asyncio.Queue]:
    """Check a request against the server's limits and turn it into a job; APIError if refused."""
    if body.model not in engine.names():
        raise APIError(404, f"The model `{body.model}` does not exist; available: {', '.join(engine.names())}.",
                       "model", "model_not_found")
    chars = sum(len(m.text()) for m in body.messages)  # before tokenising: a 1 MB message costs nothing
    if chars > limits.max_input_chars:
        raise APIError(400, f"messages: {chars} characters; this server takes at most {limits.max_input_chars} "
                       "(zhlora serve --max_input_chars).", "messages", "context_length_exceeded")
    try:
        "".join(m.text() for m in body.messages).encode("utf-8")
    except UnicodeEncodeError as err:  # JSON allows "\ud800" alone; no tokenizer takes it
        raise APIError(400, f"messages: not valid Unicode ({err.reason}).", "messages", "invalid_value") from err
    if body.messages[-1].role != "user":
        raise APIError(400, "messages: the last message must come from the user.", "messages", "invalid_value")
    asked = body.max_tokens if body.max_tokens is not None else body.max_completion_tokens
    if asked is not None and asked > limits.max_tokens:
        raise APIError(400, f"max_tokens: {asked} is more than this server allows ({limits.max_tokens}, zhlora "
                       "serve --max_tokens_limit).", "max_tokens", "invalid_value")
    try:
        prompt = encode_prompt([{"role": m.role, "content": m.text()} for m in body.messages],
                               engine.tokenizer, engine.template)
    except ValueError as err:  # TemplateError included
        raise APIError(400, f"messages: {err}", "messages", "invalid_value") from err
    room = (engine.context - len(prompt)) if engine.context else limits.max_tokens
    if room < 1 or (asked is not None and asked > room):
        raise APIError(400, f"The prompt is {len(prompt)} tokens; with max_tokens {asked or 1} that is more than "
                       f"the model's context ({engine.context}).", "messages", "context_length_exceeded")
    temperature = 0.7 if body.temperature is None else body.temperature
    queue: asyncio.Queue = asyncio.Queue()
    loop = asyncio.get_running_loop()
    job = Job(prompt, body.model, min(asked or DEFAULT_MAX_TOKENS, limits.max_tokens, room),
              do_sample=temperature > 0, temperature=temperature, top_p=0.9 if body.top_p is None else body.top_p,
              seed=body.seed, emit=lambda item: loop.call_soon_threadsafe(queue.put_nowait, item))
    return job, queue


async def _watch_disconnect(request: Request, job: Job) -> None:
    """Non-streamed answers: cancel the job if the client hangs up while it waits or runs."""
    while not job.cancel.is_set():
        if await request.is_disconnected():
            job.cancel.set()
        await asyncio.sleep(0.2)


class _Answer:
    """One chat completion on its way: its OpenAI id, then the whole answer or its server-sent events."""

    def __init__(self, engine: Engine, job: Job, queue: asyncio.Queue, body: ChatRequest):
        self.engine, self.job, self.queue, self.body = engine, job, queue, body
        self.stops = [body.stop] if isinstance(body.stop, str) else (body.stop or [])
        self.head = {"id": f"chatcmpl-{secrets.token_hex(12)}", "created": int(time.time()), "model": body.model}

    def usage(self) -> dict:
        prompt, completion = len(self.job.prompt), self.job.completion_tokens
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    async def whole(self, request: Request) -> dict:
        watcher = asyncio.create_task(_watch_disconnect(request, self.job))
        try:
            text = "".join([piece async for piece in _pieces(self.engine, self.job, self.queue, self.stops)])
        finally:
            watcher.cancel()
        return {**self.head, "object": "chat.completion", "usage": self.usage(), "choices": [
            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": self.job.finish}]}

    def _event(self, data: dict) -> str:  # one server-sent event
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

    def _chunk(self, delta: dict, finish: str | None = None) -> str:
        return self._event({**self.head, "object": "chat.completion.chunk",
                            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})

    async def events(self):
        # Starlette cancels this generator when the client disconnects: _pieces' finally cancels the job.
        yield self._chunk({"role": "assistant", "content": ""})
        try:
            async for piece in _pieces(self.engine, self.job, self.queue, self.stops):
                yield self._chunk({"content": piece})
            yield self._chunk({}, self.job.finish)
            if self.body.stream_options and self.body.stream_options.include_usage:
                yield self._event({**self.head, "object": "chat.completion.chunk", "choices": [],
                                   "usage": self.usage()})
        except APIError as err:  # the status line is sent already: the error travels as an event
            yield self._event(err.body())
        yield "data: [DONE]\n\n"


def _add_error_handlers(app: FastAPI) -> None:
    """Every refusal in OpenAI's error shape: ours (APIError), FastAPI's own (422, 404, 405) and crashes."""

    @app.exception_handler(APIError)
    async def api_error(request, err: APIError):
        return err.response()

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request, err: RequestValidationError):
        kind = request.headers.get("content-type", "")
        if request.method == "POST" and not kind.startswith("application/json"):
            # FastAPI reads only JSON bodies; a web page elsewhere cannot send that type without the
            # browser asking first (CORS), which keeps other sites from using a local server.
            return APIError(400, f"Send the body as JSON with `Content-Type: application/json` (got "
                            f"`{kind or 'none'}`).", code="invalid_content_type").response()
        return validation_error(err.errors()).response()

    @app.exception_handler(HTTPException)
    async def http_error(request, err: HTTPException):
        if err.status_code == 400:  # FastAPI could not read the body at all (not UTF-8, nested too deep)
            return APIError(400, f"We could not parse the JSON body of your request: {err.detail}.",
                            code="invalid_json").response()
        code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code)
        return APIError(err.status_code, f"{request.method} {request.url.path}: {err.detail}", code=code).response()

    @app.exception_handler(Exception)
    async def crash(request, err: Exception):
        return APIError(500, f"Internal error ({type(err).__name__}); the server's log has the details.",
                        kind="server_error").response()


def build_app(engine: Engine, limits: Limits | None = None, api_key: str | None = None) -> FastAPI:
    """The app serving `engine`: the routes above, behind the API key and body size checks (Guard)."""
    limits = limits or Limits()
    app = FastAPI(title="zhlora serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(Guard, api_key=api_key, max_body_bytes=limits.max_body_bytes)
    _add_error_handlers(app)
    created = int(time.time())

    @app.get("/health")
    async def health():
        return {"status": "ok", "pending": engine.pending}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": "zhlora"}
                                           for name in engine.names()]}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        answer = _Answer(engine, *_job(engine, limits, body), body)
        if not body.stream:
            return await answer.whole(request)
        return StreamingResponse(answer.events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.api_route("/", methods=["GET", "HEAD"])
    async def page():
        return FileResponse(WEB_DIR / "index.html", headers={"Content-Security-Policy": PAGE_POLICY,
                                                             "Cache-Control": "no-cache"})

    app.mount("/web", StaticFiles(directory=WEB_DIR), name="web")
    return app


def start_in_thread(app, host: str = "127.0.0.1", port: int = 0):
    """Serve `app` from a background thread (tests, notebooks); returns (uvicorn.Server, port).

    Stop it with `server.should_exit = True`. port 0 picks a free port.
    """
    import socket

    import uvicorn

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.bind((host, port))  # bound here, so the port is known before the thread starts
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=1))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started and thread.is_alive():
        threading.Event().wait(0.02)
    return server, sock.getsockname()[1]
