"""``sqc serve``: an OpenAI-compatible HTTP server over the continuous-batching engine.

    sqc serve ARTIFACT_OR_HF_FOLDER [--host 127.0.0.1] [--port 8000] [--max-batch 8] [--ctx 2048]

Endpoints (FastAPI on uvicorn): ``POST /v1/completions`` and ``POST /v1/chat/completions`` (``stream: true``
sends server-sent events ending in ``data: [DONE]``; the chat template is the tokenizer's), ``GET /v1/models``,
``GET /health`` and ``GET /metrics`` (Prometheus text). Responses carry OpenAI's ``usage`` object.

One thread (:class:`EngineWorker`) runs :class:`sqc.runtime.engine.Engine`; the HTTP handlers hand it
sequences and receive tokens through an asyncio queue each. Sampling settings: OpenAI's ``temperature``,
``top_p``, ``presence_penalty``, ``frequency_penalty``, ``seed``, ``stop``, ``max_tokens``, plus ``top_k``,
``min_p``, ``repetition_penalty`` and ``ignore_eos`` (as llama.cpp's and vLLM's servers take them).

Faults are answered as OpenAI answers them, with an ``error`` object: a malformed body, an unknown model, a
prompt longer than the context, ``max_tokens`` out of range and sampling values out of range get a 400 naming the
field; a full queue a 429 with ``Retry-After``; a request whose step fails a 500, alone. A client that goes away
mid-stream frees its slot at the next step. SIGTERM (uvicorn's graceful shutdown) stops accepting connections,
lets the requests in flight finish, then stops the engine.
"""
# no `from __future__ import annotations`: FastAPI reads the handlers' annotations (Request) as objects

import asyncio
import json
import os
import queue
import threading
import time
import uuid
from typing import Any, Callable

import torch

from .runtime.engine import Engine, Sequence
from .runtime.sampling import SamplingError, SamplingParams

__all__ = ["create_app", "load_served", "EngineWorker", "ServeError", "serve"]

#: upper bounds (seconds) of the step-latency histogram's buckets
STEP_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)


class ServeError(Exception):
    """A request the server answers with an OpenAI error object."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.headers = status, message, param, kind, headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": None}}


def load_served(path: str):
    """(model, tokenizer, name) from an sqc artifact folder or a Hugging Face folder saved by sqc."""
    from transformers import AutoTokenizer

    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path} is not a folder; give an sqc artifact (sqc compile --out) or a Hugging "
                                "Face folder (compiled.save_pretrained)")
    name = os.path.basename(os.path.normpath(path))
    if os.path.exists(os.path.join(path, "manifest.json")):
        import sqc

        model = sqc.load(path).model
        tok_dir = os.path.join(path, "tokenizer")
        if not os.path.isdir(tok_dir):
            raise ValueError(f"{path} carries no tokenizer, and serving needs one: write the artifact with "
                             "sqc.save(compiled, path, tokenizer=tokenizer) (sqc compile does)")
        return model, AutoTokenizer.from_pretrained(tok_dir), name
    if os.path.exists(os.path.join(path, "config.json")):
        import transformers

        from . import hf  # noqa: F401  (registers the "sqc" quantizer)

        try:
            tok = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError) as e:
            raise ValueError(f"{path} carries no tokenizer, and serving needs one: save it with "
                             f"compiled.save_pretrained(path, tokenizer=tokenizer) ({e})") from None
        model = transformers.AutoModelForCausalLM.from_pretrained(path)
        return model.eval(), tok, name
    raise FileNotFoundError(f"{path} has neither manifest.json (an sqc artifact) nor config.json (a Hugging Face "
                            "folder)")


class QueueFull(Exception):
    pass


class EngineWorker:
    """Runs an :class:`Engine` on its own thread; :meth:`submit` and :meth:`cancel` are safe from any thread."""

    def __init__(self, engine: Engine, max_queue: int = 64) -> None:
        self.engine, self.max_queue = engine, max_queue
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._pending = 0  # submitted, not yet admitted by the engine thread
        self._lock = threading.Lock()
        self.step_hist = [0] * (len(STEP_BUCKETS) + 1)
        self.step_sum = 0.0
        self.step_count = 0
        engine.on_step = self._on_step
        self._thread = threading.Thread(target=self._run, name="sqc-engine", daemon=True)

    def start(self) -> "EngineWorker":
        """Run the engine on a thread of its own (for an app embedded in another server's process)."""
        self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def run(self, until: Callable[[], bool]) -> None:
        """Run the engine on the calling thread until ``until()`` is true (checked between steps).

        ``sqc serve`` runs the engine on the main thread and the HTTP server on another: the kernels and
        torch's ops parallelize over an OpenMP team, and from a second thread (a second team) a SmolLM2
        decode step measured 23-28 ms instead of 14 ms on this 2-core machine."""
        self._loop(until)

    @property
    def queue_depth(self) -> int:
        return self._pending + len(self.engine.waiting)

    def submit(self, seq: Sequence) -> None:
        """Queue ``seq``; QueueFull when ``max_queue`` sequences already wait for a slot."""
        with self._lock:
            if self.queue_depth >= self.max_queue:
                raise QueueFull
            self._pending += 1
        self._inbox.put(("add", seq))
        self._wake.set()

    def cancel(self, seq: Sequence) -> None:
        self._inbox.put(("cancel", seq))
        self._wake.set()

    def _on_step(self, seconds: float, rows: int) -> None:
        i = next((i for i, b in enumerate(STEP_BUCKETS) if seconds <= b), len(STEP_BUCKETS))
        self.step_hist[i] += 1
        self.step_sum += seconds
        self.step_count += 1

    def _drain(self) -> None:
        while True:
            try:
                what, seq = self._inbox.get_nowait()
            except queue.Empty:
                return
            if what == "cancel":
                self.engine.cancel(seq)
                continue
            with self._lock:
                self._pending -= 1
            try:
                self.engine.add(seq)
            except Exception as e:  # checked by the handler already; anything left fails this sequence alone
                seq.error, seq.finish_reason = e, "error"
                if seq.on_finish is not None:
                    seq.on_finish(seq)

    def _run(self) -> None:
        self._loop(lambda: False)

    def _loop(self, until: Callable[[], bool]) -> None:
        torch.set_grad_enabled(False)
        while not self._stop.is_set() and not until():
            self._drain()
            if self.engine.idle:
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            self.engine.step()


class _TextStream:
    """Incremental detokenization with stop strings: :meth:`push` returns the new text that is safe to send
    (no half UTF-8 character, no prefix of a stop string) and whether a stop string ended the text."""

    def __init__(self, tokenizer, stops: list[str]) -> None:
        self.tok, self.stops = tokenizer, stops
        self.ids: list[int] = []
        self.sent = 0
        self.text = ""
        self.stopped = False

    def push(self, token: int) -> str:
        self.ids.append(token)
        self.text = self.tok.decode(self.ids, skip_special_tokens=True)
        for s in self.stops:
            at = self.text.find(s, max(0, self.sent - len(s)))
            if at >= 0:
                self.text, self.stopped = self.text[:at], True
                return self._take(len(self.text))
        safe = len(self.text)
        if self.text.endswith("\ufffd"):
            safe -= 1
        for s in self.stops:  # hold back a tail that may grow into a stop string
            for k in range(min(len(s) - 1, safe - self.sent), 0, -1):
                if self.text[safe - k:safe] == s[:k]:
                    safe -= k
                    break
        return self._take(safe)

    def flush(self) -> str:
        return self._take(len(self.text.rstrip("\ufffd")) if not self.stopped else len(self.text))

    def _take(self, upto: int) -> str:
        if upto <= self.sent:
            return ""
        out, self.sent = self.text[self.sent:upto], upto
        return out


# -- request parsing ---------------------------------------------------------------------------------

def _number(body: dict, field: str, default, kind=float):
    v = body.get(field, default)
    if v is None:
        return default
    ok = isinstance(v, int) if kind is int else isinstance(v, (int, float))
    if isinstance(v, bool) or not ok:
        raise ServeError(400, f"'{field}' must be {'an integer' if kind is int else 'a number'}, got {v!r}", field)
    return v


def _sampling(body: dict) -> SamplingParams:
    fields = dict(temperature=_number(body, "temperature", 1.0), top_p=_number(body, "top_p", 1.0),
                  top_k=_number(body, "top_k", 0, int), min_p=_number(body, "min_p", 0.0),
                  repetition_penalty=_number(body, "repetition_penalty", 1.0),
                  presence_penalty=_number(body, "presence_penalty", 0.0),
                  frequency_penalty=_number(body, "frequency_penalty", 0.0), seed=_number(body, "seed", None, int))
    if fields["temperature"] > 2:
        raise ServeError(400, f"'temperature' must be between 0 and 2, got {fields['temperature']!r}", "temperature")
    try:
        return SamplingParams(**fields)
    except SamplingError as e:
        raise ServeError(400, str(e).replace("sampling: ", ""), e.field) from None


def _stops(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops) or len(stops) > 4:
        raise ServeError(400, "'stop' must be a string or a list of at most 4 strings", "stop")
    return [s for s in stops if s]


class _App:
    """The state behind the routes: the worker, the tokenizer, the counters."""

    def __init__(self, model, tokenizer, name: str, max_batch: int, ctx: int, max_queue: int,
                 compile_step: bool) -> None:
        self.tok, self.name, self.ctx = tokenizer, name, ctx
        self.engine = Engine(model, max_batch=max_batch, ctx=ctx, compile_step=compile_step)
        self.worker = EngineWorker(self.engine, max_queue=max_queue)
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        if eos is None:
            eos = tokenizer.eos_token_id
        self.stop_ids = frozenset([eos] if isinstance(eos, int) else (eos or []))
        self.requests = {"ok": 0, "error": 0, "cancelled": 0, "rejected": 0}
        self.created = int(time.time())

    # -- one request -------------------------------------------------------------------------
    def prepare(self, body: Any, chat: bool) -> tuple[torch.Tensor, Sequence, list[str], bool, dict]:
        if not isinstance(body, dict):
            raise ServeError(400, "the request body must be a JSON object")
        model = body.get("model")
        if model is not None and model != self.name:
            raise ServeError(400, f"the model '{model}' does not exist; this server serves '{self.name}'", "model")
        if body.get("n", 1) != 1:
            raise ServeError(400, "'n' must be 1 (one choice per request)", "n")
        for unsupported in ("logprobs", "echo", "suffix", "tools", "functions"):
            if body.get(unsupported) not in (None, False):
                raise ServeError(400, f"'{unsupported}' is not supported by this server", unsupported)
        ids = self._chat_ids(body) if chat else self._prompt_ids(body)
        n = len(ids)
        if n >= self.ctx:
            raise ServeError(400, f"the prompt has {n} tokens; the context holds {self.ctx} (a prompt may have at "
                                  f"most {self.ctx - 1})", "messages" if chat else "prompt")
        room = self.ctx - n
        max_tokens = _number(body, "max_completion_tokens" if chat and "max_completion_tokens" in body
                             else "max_tokens", None if chat else 16, int)
        if max_tokens is None:
            max_tokens = room
        if max_tokens < 1 or max_tokens > room:
            raise ServeError(400, f"'max_tokens' must be between 1 and {room} (the context holds {self.ctx} tokens, "
                                  f"the prompt takes {n}), got {max_tokens}", "max_tokens")
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise ServeError(400, f"'stream' must be true or false, got {stream!r}", "stream")
        opts = body.get("stream_options") or {}
        ignore_eos = body.get("ignore_eos", False)
        if not isinstance(ignore_eos, bool):
            raise ServeError(400, f"'ignore_eos' must be true or false, got {ignore_eos!r}", "ignore_eos")
        seq = Sequence(torch.tensor(ids, dtype=torch.long), max_tokens, _sampling(body),
                       frozenset() if ignore_eos else self.stop_ids)
        try:
            self.engine.check(seq)
        except ValueError as e:
            raise ServeError(400, str(e), "prompt") from None
        return seq.prompt, seq, _stops(body), stream, opts

    def _prompt_ids(self, body: dict) -> list[int]:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, str):
            ids = self.tok(prompt, add_special_tokens=False)["input_ids"]
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool)
                                                         for t in prompt):
            ids = prompt
        else:
            raise ServeError(400, "'prompt' must be a non-empty string or a list of token ids (one prompt per "
                                  "request)", "prompt")
        if not ids:
            raise ServeError(400, "'prompt' is empty", "prompt")
        return list(ids)

    def _chat_ids(self, body: dict) -> list[int]:
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in msgs):
            raise ServeError(400, "'messages' must be a non-empty list of {role, content} objects with string "
                                  "content", "messages")
        if not getattr(self.tok, "chat_template", None):
            raise ServeError(400, f"the model '{self.name}' has no chat template; use /v1/completions", "messages")
        try:
            ids = self.tok.apply_chat_template([{"role": m["role"], "content": m["content"]} for m in msgs],
                                               add_generation_prompt=True, tokenize=True)
        except Exception as e:  # a template that raises on these messages (roles it does not know)
            raise ServeError(400, f"the chat template refused the messages: {e}", "messages") from None
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)

    def start(self, seq: Sequence, loop: asyncio.AbstractEventLoop) -> asyncio.Queue:
        q: asyncio.Queue = asyncio.Queue()
        seq.on_token = lambda s, t: loop.call_soon_threadsafe(q.put_nowait, t)
        seq.on_finish = lambda s: loop.call_soon_threadsafe(q.put_nowait, None)
        try:
            self.worker.submit(seq)
        except QueueFull:
            self.requests["rejected"] += 1
            raise ServeError(429, "the server is busy: too many requests are waiting; retry shortly", None,
                             "rate_limit_error", {"Retry-After": "1"}) from None
        return q

    def usage(self, seq: Sequence) -> dict:
        n_in, n_out = int(seq.prompt.numel()), len(seq.tokens)
        return {"prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out}

    def finished(self, seq: Sequence, text: _TextStream) -> str:
        if seq.error is not None:
            self.requests["error"] += 1
            raise ServeError(500, f"the request failed in the model step: {seq.error}", None, "server_error")
        if seq.finish_reason == "cancelled" and not text.stopped:
            self.requests["cancelled"] += 1
            return "cancelled"
        self.requests["ok"] += 1
        return "stop" if text.stopped or seq.finish_reason == "stop" else "length"

    # -- metrics -------------------------------------------------------------------------------
    def metrics(self) -> str:
        e, w = self.engine, self.worker
        lines = ["# HELP sqc_requests_total Requests by outcome.", "# TYPE sqc_requests_total counter"]
        lines += [f'sqc_requests_total{{outcome="{k}"}} {v}' for k, v in self.requests.items()]
        for name, help_, value, kind in (
                ("sqc_prompt_tokens_total", "Prompt tokens written into the KV cache.", e.stats["tokens_in"],
                 "counter"),
                ("sqc_generated_tokens_total", "Tokens generated.", e.stats["tokens_out"], "counter"),
                ("sqc_queue_depth", "Requests waiting for a slot.", w.queue_depth, "gauge"),
                ("sqc_active_sequences", "Sequences holding a slot.", len(e.active), "gauge"),
                ("sqc_slots", "Slots (the largest batch).", e.max_batch, "gauge"),
                ("sqc_step_compiles_total", "Decode steps compiled.", e.stats["compiles"], "counter")):
            lines += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}", f"{name} {value}"]
        lines += ["# HELP sqc_step_seconds Decode step latency.", "# TYPE sqc_step_seconds histogram"]
        acc = 0
        for b, n in zip((*STEP_BUCKETS, "+Inf"), w.step_hist):
            acc += n
            lines.append(f'sqc_step_seconds_bucket{{le="{b}"}} {acc}')
        lines += [f"sqc_step_seconds_sum {w.step_sum}", f"sqc_step_seconds_count {w.step_count}"]
        return "\n".join(lines) + "\n"


def create_app(model, tokenizer, name: str = "sqc", max_batch: int = 8, ctx: int = 2048, max_queue: int = 64,
               compile_step: bool = True, engine_thread: bool = True):
    """The FastAPI application serving ``model`` (a transformers causal LM with sqc layers).

    With ``engine_thread`` the app's lifespan runs the engine on a thread of its own; without, the caller runs
    ``app.state.sqc.worker.run(...)`` on its thread (:func:`serve` does, on the main thread)."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

    state = _App(model, tokenizer, name, max_batch, ctx, max_queue, compile_step)

    @asynccontextmanager
    async def lifespan(app):
        if engine_thread:
            state.worker.start()
        try:
            yield
        finally:
            if engine_thread:
                state.worker.stop()

    app = FastAPI(title="sqc", lifespan=lifespan)
    app.state.sqc = state

    def error(e: ServeError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    async def body_of(request: Request) -> Any:
        try:
            return json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ServeError(400, f"the request body is not valid JSON: {e}") from None

    async def complete(request: Request, chat: bool):
        try:
            prompt, seq, stops, stream, opts = state.prepare(await body_of(request), chat)
            q = state.start(seq, asyncio.get_running_loop())
        except ServeError as e:
            return error(e)
        text = _TextStream(state.tok, stops)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        obj = "chat.completion" if chat else "text_completion"
        created = int(time.time())

        def choice(text_: str | None = None, finish: str | None = None, delta: dict | None = None) -> dict:
            """One choice: a chat delta (``delta``), a whole chat message, or completion text."""
            if chat and delta is not None:
                return {"index": 0, "delta": delta, "finish_reason": finish}
            if chat:
                return {"index": 0, "message": {"role": "assistant", "content": text_}, "finish_reason": finish}
            return {"index": 0, "text": text_ or "", "logprobs": None, "finish_reason": finish}

        def piece_choice(piece: str) -> dict:
            return choice(delta={"content": piece}) if chat else choice(piece)

        async def next_text() -> str | None:
            """Text produced by the next token (None when the sequence ended)."""
            token = await q.get()
            if token is None:
                return None
            if text.stopped:
                return ""
            piece = text.push(token)
            if text.stopped:
                state.worker.cancel(seq)
            return piece

        if not stream:
            parts = []
            try:
                while (piece := await next_text()) is not None:
                    parts.append(piece)
                parts.append(text.flush())
                finish = state.finished(seq, text)
            except ServeError as e:
                return error(e)
            finally:
                if not seq.done:
                    state.worker.cancel(seq)
            return JSONResponse({"id": rid, "object": obj, "created": created, "model": state.name,
                                 "choices": [choice("".join(parts), finish)], "usage": state.usage(seq)})

        def sse(payload: dict | str) -> str:
            return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"

        async def events():
            chunk = {"id": rid, "object": obj + ".chunk" if chat else obj, "created": created, "model": state.name}
            try:
                if chat:
                    yield sse({**chunk, "choices": [choice(delta={"role": "assistant", "content": ""})]})
                while (piece := await next_text()) is not None:
                    if piece:
                        yield sse({**chunk, "choices": [piece_choice(piece)]})
                tail = text.flush()
                if tail:
                    yield sse({**chunk, "choices": [piece_choice(tail)]})
                try:
                    finish = state.finished(seq, text)
                except ServeError as e:
                    yield sse(e.body())
                else:
                    yield sse({**chunk, "choices": [choice(finish=finish, delta={}) if chat else choice("", finish)]})
                    if opts.get("include_usage"):
                        yield sse({**chunk, "choices": [], "usage": state.usage(seq)})
                yield sse("[DONE]")
            finally:  # the client went away (or we are done): free the slot at the next step
                if not seq.done:
                    state.worker.cancel(seq)
                    state.requests["cancelled"] += 1

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await complete(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await complete(request, chat=True)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": state.name, "object": "model", "created": state.created,
                                            "owned_by": "sqc", "max_model_len": state.ctx}]}

    @app.get("/health")
    async def health():
        return {"status": "ok", "active_sequences": len(state.engine.active), "queue_depth": state.worker.queue_depth}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(state.metrics(), media_type="text/plain; version=0.0.4")

    return app


def serve(path: str, host: str = "127.0.0.1", port: int = 8000, max_batch: int = 8, ctx: int = 2048,
          max_queue: int = 64, compile_step: bool = True, name: str | None = None, ready=None) -> None:
    """Load ``path`` and serve it until SIGINT/SIGTERM: then no new connections are taken, the requests in flight
    finish (uvicorn's graceful shutdown), and the engine stops. ``ready()`` is called once the socket listens.

    The engine runs on this (the main) thread, uvicorn on another (:meth:`EngineWorker.run` says why)."""
    import signal

    import uvicorn

    model, tok, default_name = load_served(path)
    app = create_app(model, tok, name or default_name, max_batch, ctx, max_queue, compile_step, engine_thread=False)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                           timeout_graceful_shutdown=60))
    http = threading.Thread(target=server.run, name="sqc-http", daemon=True)

    def on_signal(signum, frame):
        server.should_exit = True  # uvicorn stops listening, waits for the requests in flight, then returns

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        http.start()
        while not server.started and http.is_alive():
            time.sleep(0.02)
        if not http.is_alive():
            raise OSError(f"the HTTP server could not start on {host}:{port} (is the port in use?)")
        if ready is not None:
            ready()
        app.state.sqc.worker.run(until=lambda: not http.is_alive())
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)
