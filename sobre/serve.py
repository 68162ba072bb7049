"""`sobre serve`: an OpenAI / DeepSeek-compatible API over the batched engine, with continuous batching, SSE
streaming, `reasoning_content`, Prometheus metrics and the web chat page at `/`.

The engine runs in its own process (`sobre serve`) or in a thread (an Engine made in Python), behind the same
front end (worker.py): requests join between decode steps and leave when they finish, are cancelled (client
gone, timeout) or fail; each request's tokens reach its handler through an asyncio queue.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from starlette.exceptions import HTTPException

from .chat import ReasoningStream, split_reasoning
from .engine import Engine
from .protocol import APIError, error_body
from .request import Event
from .sampling import GENERATION_KEYS, SamplingParams
from .tokenizer import TextStream, eos_ids
from .worker import Done, EngineClient, EngineThread, Sink

log = logging.getLogger("sobre.serve")
ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics", "/")
STATIC = Path(__file__).parent / "static"
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               405: "invalid_request_error", 408: "timeout_error", 413: "invalid_request_error",
               422: "invalid_request_error", 429: "rate_limit_error", 503: "overloaded_error"}


# ---- one completion (choice) of a request ---------------------------------------------------------
class Choice:
    """Turns one engine request's events into text deltas: incremental detokenisation, stop strings held back
    until they cannot match any more, reasoning split from the answer (chat)."""

    def __init__(self, sink: Sink, tok, params: SamplingParams, reasoning: ReasoningStream | None):
        self.index, self.sink, self.tok, self.params, self.split = sink.index, sink, tok, params, reasoning
        self.stream, self.full, self.sent = TextStream(tok), "", 0
        self.holdback = max((len(s) for s in params.stop), default=1) - 1
        self.tokens: list[int] = []
        self.logprobs: list = []
        self.finish_reason: str | None = None
        self.cached = 0  # prompt tokens served from the prefix cache
        self.t_first: float | None = None

    def feed(self, item) -> str | None:
        """One queue item -> the new text it makes safe to send ('' if none yet); None when it was the end."""
        if isinstance(item, Exception):
            raise item
        if isinstance(item, Done):  # the end: stop strings cut the text where they matched
            self.finish_reason = "stop" if item.finish_reason in ("stop", "cancelled") else item.finish_reason
            self.cached = item.cached
            self.full += self.stream.flush()
            end = len(self.full)
            if self.params.stop and item.finish_reason == "stop" and item.text is not None:
                end = min(end, len(item.text))
            out, self.sent = self.full[self.sent:end], max(self.sent, end)
            self.full = self.full[:end]
            return out if out else None
        ev: Event = item
        self.t_first = self.t_first or time.perf_counter()
        self.tokens.append(ev.token)
        if ev.logprob is not None:
            self.logprobs.append((ev.token, *ev.logprob))
        self.full += self.stream.feed(ev.token)
        if ev.finished:  # the Sequence that follows says where a stop string cut the text
            return ""
        safe = len(self.full) - self.holdback
        out, self.sent = self.full[self.sent:safe], max(self.sent, safe)
        return out

    def split_delta(self, text: str, final: bool = False) -> tuple[str, str]:
        if self.split is None:
            return "", text
        r, c = self.split.feed(text)
        if final:
            fr, fc = self.split.flush()
            r, c = r + fr, c + fc
        return r, c


# ---- the app --------------------------------------------------------------------------------------
class EngineCounts:
    """The engine's own counts, read at scrape time from its latest snapshot: MTP drafts proposed / accepted
    (acceptance = their ratio), prompt tokens served from the prefix cache / prefilled, requests cancelled, cache
    blocks in use."""

    def __init__(self, engine: EngineClient):
        self.engine = engine

    def collect(self):
        n = self.engine.counts
        for name, doc, key in (("sobre_spec_draft_tokens", "MTP draft tokens proposed", "spec_drafted"),
                               ("sobre_spec_accepted_tokens", "MTP draft tokens accepted", "spec_accepted"),
                               ("sobre_spec_drafts", "speculative steps: verify forwards, per sequence",
                                "spec_verified"),
                               ("sobre_spec_stopped_sequences", "sequences that stopped drafting (drafts too rarely "
                                "accepted)", "spec_stopped"),
                               ("sobre_prefix_cache_hit_tokens", "prompt tokens reused from the prefix cache",
                                "prefix_hit"),
                               ("sobre_prefix_cache_miss_tokens", "prompt tokens prefilled with the prefix cache on",
                                "prefix_miss"),
                               ("sobre_cancelled_requests", "requests cancelled before they finished (client gone, "
                                "timeout)", "cancelled")):
            yield CounterMetricFamily(name, doc, value=n[key])
        yield GaugeMetricFamily("sobre_running_sequences", "sequences in the running batch", value=n["running"])
        yield GaugeMetricFamily("sobre_kv_cache_usage", "fraction of the cache pool's blocks in use",
                                value=1 - n["blocks_free"] / n["blocks"])


class Server:
    """The API's state: the engine's front end (an Engine made in Python is run in a thread), the tokenizer,
    limits and metrics."""

    def __init__(self, engine: Engine | EngineClient, name: str, api_key: str | None = None, max_queue: int = 256,
                 timeout: float = 600.0, defaults: dict | None = None, max_body: int = 8 << 20):
        if engine.tokenizer is None:
            raise ValueError("serving needs a tokenizer (tokenizer.json in the model folder)")
        if max_queue < 1 or not timeout > 0:
            raise ValueError(f"max_queue must be >= 1 and timeout > 0, got {max_queue} and {timeout}")
        self.loop = engine if isinstance(engine, EngineClient) else EngineThread(engine)
        self.tok, self.name, self.api_key, self.max_queue = engine.tokenizer, name, api_key, max_queue
        self.timeout, self.max_body, self.created = timeout, max_body, int(time.time())
        self.context = self.loop.config.max_seq_len
        self.eos = eos_ids(self.loop.config, self.tok)
        self.defaults = defaults or {}
        self._metrics()

    def _metrics(self):
        r = self.registry = CollectorRegistry()
        self.m_requests = Counter("sobre_requests", "finished requests", ["endpoint", "status"], registry=r)
        self.m_prompt = Counter("sobre_prompt_tokens", "prompt tokens", registry=r)
        self.m_generated = Counter("sobre_generation_tokens", "generated tokens", registry=r)
        Gauge("sobre_queue_depth", "requests waiting for a batch slot", registry=r).set_function(self.loop.queued)
        buckets = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
        self.m_ttft = Histogram("sobre_time_to_first_token_seconds", "TTFT", registry=r, buckets=buckets)
        self.m_tpot = Histogram("sobre_time_per_output_token_seconds", "TPOT", registry=r, buckets=buckets)
        r.register(EngineCounts(self.loop))

    # ---- validation ----------------------------------------------------------------------------
    def check_key(self, request: Request):
        if self.api_key is None:
            return
        auth = request.headers.get("authorization", "")
        if auth != f"Bearer {self.api_key}":
            raise APIError(401, "missing or invalid API key (Authorization: Bearer KEY)", "authentication_error",
                           code="invalid_api_key")

    def check_model(self, model: str | None) -> str:
        """The name a request's `model` serves under (the base model's, or a LoRA adapter's: --lora-modules)."""
        if model is not None and model != self.name and model not in self.loop.limits.loras:
            also = "".join(f", {a!r}" for a in self.loop.limits.loras)
            raise APIError(404, f"the model {model!r} does not exist; this server serves {self.name!r}{also}",
                           param="model", code="model_not_found")
        return model or self.name

    def params(self, req, prompt_len: int, max_tokens: int | None, logprobs: int | None, seed_offset: int,
               json: bool | dict = False, tool_calls: dict | None = None) -> SamplingParams:
        room = self.context - prompt_len
        if room < 1:
            raise APIError(400, f"this model's maximum context length is {self.context} tokens; the prompt has "
                           f"{prompt_len}", param="messages", code="context_length_exceeded")
        if max_tokens is not None and max_tokens > room:
            raise APIError(400, f"this model's maximum context length is {self.context} tokens; you asked for "
                           f"{prompt_len + max_tokens} ({prompt_len} in the prompt, {max_tokens} to generate)",
                           param="max_tokens", code="context_length_exceeded")
        # the checkpoint's generation_config.json values where the request left a field unset (as vLLM)
        s = {k: self.defaults[k] if k in self.defaults and k not in req.model_fields_set else getattr(req, k)
             for k in GENERATION_KEYS}
        try:
            return SamplingParams(
                max_new_tokens=max_tokens or room, min_tokens=req.min_tokens, temperature=s["temperature"],
                top_k=max(s["top_k"], 0), top_p=s["top_p"], min_p=s["min_p"], presence_penalty=req.presence_penalty,
                frequency_penalty=req.frequency_penalty, repetition_penalty=s["repetition_penalty"],
                stop_token_ids=(() if req.ignore_eos else self.eos) + tuple(req.stop_token_ids or ()),
                stop=tuple(req.stop or ()), include_stop_str_in_output=req.include_stop_str_in_output,
                seed=None if req.seed is None else req.seed + seed_offset, logprobs=logprobs,
                logit_bias=req.logit_bias, json=bool(json),  # (SamplingParams makes the ids ints)
                json_schema=json if isinstance(json, dict) else None, tool_calls=tool_calls,
                lora=req.model if req.model in self.loop.limits.loras else None)
        except ValueError as e:
            raise APIError(400, str(e), param=field(e, None)) from None

    # ---- running requests --------------------------------------------------------------------------
    async def start(self, prompts: list[list[int]], n: int, make_params, reasoning: bool, param: str
                    ) -> list[Choice]:
        loop, q, choices = asyncio.get_running_loop(), asyncio.Queue(), []
        if self.loop.queued() >= self.max_queue:
            raise APIError(503, f"server overloaded: {self.loop.queued()} requests waiting (--max-queue "
                           f"{self.max_queue}); retry shortly", code="server_overloaded", headers={"Retry-After": "1"})
        try:
            for p, prompt in enumerate(prompts):
                for j in range(n):
                    params = make_params(len(prompt), j)
                    sink = Sink(loop, q, p * n + j)
                    self.loop.submit(prompt, params, sink)
                    choices.append(Choice(sink, self.tok, params, ReasoningStream(True) if reasoning else None))
        except ValueError as e:
            self.stop(choices)
            raise APIError(400, str(e), param=field(e, param)) from None
        except RuntimeError as e:  # the engine's process is gone
            self.stop(choices)
            raise APIError(503, str(e), "overloaded_error", code="engine_unavailable") from None
        except APIError:
            self.stop(choices)
            raise
        self.m_prompt.inc(sum(len(p) for p in prompts) * n)
        return choices

    def stop(self, choices: list[Choice]):
        for c in choices:
            if c.finish_reason is None:
                self.loop.cancel(c.sink)

    async def events(self, choices: list[Choice], request: Request):
        """Yield (choice, text delta, final) until every choice has finished, merging the tokens that arrived
        together; cancel them all on timeout or when the client goes away."""
        q, t0, live = choices[0].sink.queue, time.perf_counter(), len(choices)
        watch = asyncio.ensure_future(self._watch(q, request))
        try:
            while live:
                items = [await q.get()]
                while not q.empty():
                    items.append(q.get_nowait())
                text: dict[int, str] = {}
                for index, item in items:
                    if index is None:  # from the watchdog
                        raise item
                    c = choices[index]
                    try:
                        delta = c.feed(item)
                    except ValueError as e:
                        raise APIError(400, str(e)) from None
                    except RuntimeError as e:
                        raise APIError(500, str(e), "internal_error") from None
                    text[index] = text.get(index, "") + (delta or "")
                for index, delta in text.items():
                    c = choices[index]
                    if c.finish_reason is not None:
                        live -= 1
                        self._observe(c, t0)
                        yield c, delta, True
                    elif delta:
                        yield c, delta, False
        finally:
            watch.cancel()
            self.stop(choices)

    async def _watch(self, q: asyncio.Queue, request: Request):
        deadline = time.monotonic() + self.timeout
        while True:
            await asyncio.sleep(min(0.5, max(deadline - time.monotonic(), 0.001)))
            if time.monotonic() >= deadline:
                q.put_nowait((None, APIError(408, f"request timed out after {self.timeout:g} s", "timeout_error",
                                             code="timeout")))
                return
            if await request.is_disconnected():
                q.put_nowait((None, asyncio.CancelledError()))
                return

    def count(self, path: str, status: int):
        endpoint = path if path in ENDPOINTS else "other"
        self.m_requests.labels(endpoint=endpoint, status=str(status)).inc()

    def _observe(self, c: Choice, t0: float):
        self.m_generated.inc(len(c.tokens))
        if c.t_first is not None:
            self.m_ttft.observe(c.t_first - t0)
            if len(c.tokens) > 1:
                self.m_tpot.observe((time.perf_counter() - c.t_first) / (len(c.tokens) - 1))

    # ---- response pieces ----------------------------------------------------------------------------
    def usage(self, prompts: list[list[int]], n: int, choices: list[Choice]) -> dict:
        p, c = sum(len(x) for x in prompts) * n, sum(len(x.tokens) for x in choices)
        hit = sum(x.cached for x in choices)  # DeepSeek API's cache fields, and OpenAI's cached_tokens
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c, "prompt_cache_hit_tokens": hit,
                "prompt_cache_miss_tokens": p - hit, "prompt_tokens_details": {"cached_tokens": hit}}

    def chat_logprobs(self, entries: list) -> dict:
        def item(t, lp):
            s = self.tok.decode([t])
            return {"token": s, "logprob": lp, "bytes": list(s.encode())}
        return {"content": [dict(item(t, lp), top_logprobs=[item(i, v) for i, v in top.items()])
                            for t, lp, top in entries]}

    def completion_logprobs(self, entries: list, offset: int) -> dict:
        tokens = [self.tok.decode([t]) for t, _, _ in entries]
        offsets, pos = [], offset
        for s in tokens:
            offsets.append(pos)
            pos += len(s)
        return {"tokens": tokens, "token_logprobs": [lp for _, lp, _ in entries],
                "top_logprobs": [{self.tok.decode([i]): v for i, v in top.items()} for _, _, top in entries],
                "text_offset": offsets}


API_NAMES = {"max_new_tokens": "max_tokens", "json_schema": "response_format"}  # SamplingParams' -> the API's


def field(e: ValueError, default: str | None) -> str | None:
    """The request field a ValueError names (sampling.ParamError), as the API calls it; else default."""
    p = getattr(e, "param", None)
    return API_NAMES.get(p, p) if p else default


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def create_app(engine: Engine | EngineClient, name: str = "sobre", api_key: str | None = None, max_queue: int = 256,
               timeout: float = 600.0, defaults: dict | None = None, allowed_origins: tuple[str, ...] = ("*",)
               ) -> FastAPI:
    """The ASGI app over an Engine (run in a thread here) or an EngineProcess. `app.state.server` holds the
    Server; server.loop.close() stops the engine. defaults: sampling values for requests that leave them unset
    (sampling.generation_defaults of the checkpoint; `sobre serve` passes them). allowed_origins: the web origins
    whose pages may call the API from a browser (CORS; any by default, as vLLM's server; empty: none but this one)
    - the API key still guards /v1 (a browser's preflight carries none, and needs none)."""
    from .api import routes
    srv = Server(engine, name, api_key, max_queue, timeout, defaults)
    app = FastAPI(title="sobre", version="0.1.0", description="OpenAI / DeepSeek-compatible API")
    app.state.server = srv
    if allowed_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(allowed_origins), allow_methods=["*"],
                           allow_headers=["*"])

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, e: RequestValidationError):
        err = e.errors()[0] if e.errors() else {"loc": (), "msg": "invalid request", "type": ""}
        if err.get("type") == "json_invalid":  # loc is ("body", character offset): no parameter to name
            why = (err.get("ctx") or {}).get("error") or err.get("msg")
            msg = f"the request body is not valid JSON: {why} at character {err['loc'][-1]}"
            return JSONResponse(error_body(msg, "invalid_request_error", None, "json_invalid"), status_code=400)
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        msg = f"{'.'.join(loc) or 'body'}: {err.get('msg')}"
        return JSONResponse(error_body(msg, "invalid_request_error", ".".join(loc) or None, err.get("type")),
                            status_code=422)

    @app.exception_handler(HTTPException)
    async def _http(request, e: HTTPException):
        return JSONResponse(error_body(str(e.detail), ERROR_TYPES.get(e.status_code, "invalid_request_error"),
                                       code=str(e.status_code)), status_code=e.status_code, headers=e.headers)

    @app.exception_handler(Exception)
    async def _internal(request, e: Exception):
        log.exception("internal error")
        return JSONResponse(error_body(f"internal error: {e}", "internal_error"), status_code=500)

    app.add_middleware(RequestLog, max_body=srv.max_body, on_done=srv.count)
    routes(app, srv, Depends(srv.check_key))

    @app.get("/", include_in_schema=False)
    async def page():
        return HTMLResponse((STATIC / "chat.html").read_text())

    @app.get("/health")
    async def health():
        if srv.loop.error:
            return JSONResponse(error_body(srv.loop.error, "overloaded_error", code="engine_unavailable"),
                                status_code=503)
        return {"status": "ok", "model": srv.name, "running": srv.loop.counts["running"],
                "waiting": srv.loop.queued()}

    @app.get("/metrics", include_in_schema=False)
    async def metrics():
        return Response(generate_latest(srv.registry), media_type="text/plain; version=0.0.4")

    return app


class RequestLog:
    """ASGI middleware: refuses bodies over max_body (413) and logs one line per request when its response
    ends (streams included): method, path, status, milliseconds, tokens."""

    def __init__(self, app, max_body: int, on_done=None):
        self.app, self.max_body, self.on_done = app, max_body, on_done

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, status = time.perf_counter(), [0]
        headers = dict(scope.get("headers") or [])
        size = headers.get(b"content-length", b"0")
        if size.isdigit() and int(size) > self.max_body:
            body = json.dumps(error_body(f"request body of {int(size)} bytes is over the limit of {self.max_body}",
                                         "invalid_request_error", code="request_too_large")).encode()
            await send({"type": "http.response.start", "status": 413,
                        "headers": [(b"content-type", b"application/json")]})
            await send({"type": "http.response.body", "body": body})
            status[0] = 413
        else:
            async def logged(msg):
                if msg["type"] == "http.response.start":
                    status[0] = msg["status"]
                await send(msg)
            await self.app(scope, receive, logged)
        state = scope.get("state") or {}
        tokens = f" prompt={state['prompt_tokens']} completion={state.get('completion_tokens', '-')}" \
            if "prompt_tokens" in state else ""
        if self.on_done is not None:
            self.on_done(scope["path"], status[0])
        client = scope.get("client") or ("-", 0)
        log.info("%s %s %s %d %.1fms%s", client[0], scope["method"], scope["path"], status[0],
                 (time.perf_counter() - t0) * 1e3, tokens)


def request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def split_final(choice: Choice, started_thinking: bool) -> tuple[str | None, str]:
    """Non-streamed chat: (reasoning_content or None, content) of a finished choice."""
    reasoning, content = split_reasoning(choice.full, started_thinking)
    return (reasoning if (started_thinking or reasoning) else None), content
