"""The OpenAI-compatible HTTP API (FastAPI): completions and chat completions, streaming or not.

    app = build_app(router, model_name, tokenizer, serve_cfg, max_model_len, metrics)

Every request is checked field by field before it reaches the router; a bad one gets OpenAI's error
shape, {"error": {"message", "type", "param", "code"}}, with a 4xx status and the server keeps serving.
Every admitted request has a deadline (serve.request_timeout_s): past it, or when its worker fails, a
plain request gets 503 and a stream ends with an error event; neither ever hangs.
"""

from __future__ import annotations

import asyncio
import json
import os
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from .sampling import SamplingParams

PLAIN_CHAT_TEMPLATE = "{role}: {content}\n"  # per message, then "assistant:" (used without a tokenizer template)
MAX_STOP = 4


class Metrics:
    """What /metrics shows (its own registry, so several apps can live in one process)."""

    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.router_waiting = Gauge("dist_serve_router_waiting", "requests waiting for pages on a decode worker",
                                    registry=r)
        self.worker_waiting = Gauge("dist_serve_worker_waiting", "requests queued for prefill", ["rank"], registry=r)
        self.running_batch = Gauge("dist_serve_running_batch", "requests in the decode batch", ["rank"], registry=r)
        self.kv_blocks_used = Gauge("dist_serve_kv_blocks_used", "KV pages in use", ["rank"], registry=r)
        self.kv_bytes = Counter("dist_serve_kv_bytes_moved", "KV bytes moved from prefill to decode workers",
                                registry=r)
        self.ttft = Histogram("dist_serve_ttft_seconds", "time to first token", registry=r,
                              buckets=(.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60))
        self.tpot = Histogram("dist_serve_tpot_seconds", "time per output token after the first", registry=r,
                              buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1))
        self.kv_transfer = Histogram("dist_serve_kv_transfer_seconds", "KV transfer time per request", registry=r,
                                     buckets=(.0005, .001, .0025, .005, .01, .025, .05, .1, .25, 1))
        self.requests = Counter("dist_serve_requests", "finished requests by finish reason", ["finish"],
                                registry=r)


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def _number(body, key, default, lo, hi, integer=False):
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        raise ApiError(400, f"'{key}' must be {'an integer' if integer else 'a number'}, got {value!r}", key)
    if not lo <= value <= hi:
        raise ApiError(400, f"'{key}' must be in [{lo}, {hi}], got {value!r}", key)
    return value


def chat_prompt(messages, tokenizer) -> str:
    """The tokenizer's chat template when it has one, else PLAIN_CHAT_TEMPLATE per message + "assistant:"."""
    template = getattr(tokenizer, "chat_template", None)
    if template:
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):  # HF templates call it to refuse a conversation
            raise TemplateError(message)

        try:
            return ImmutableSandboxedEnvironment().from_string(template).render(
                messages=messages, add_generation_prompt=True, bos_token="", eos_token="",
                raise_exception=raise_exception)
        except TemplateError as e:
            raise ApiError(400, f"the model's chat template refused the messages: {e}", "messages") from None
    return "".join(PLAIN_CHAT_TEMPLATE.format(**m) for m in messages) + "assistant:"


def parse_request(body, chat: bool, model_name: str, tokenizer, max_model_len: int):
    """A request body -> (prompt ids, SamplingParams, stream); ApiError naming the field otherwise."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str):
        raise ApiError(400, "'model' is required and must be a string", "model")
    if model != model_name:
        raise ApiError(404, f"the model '{model}' does not exist; this server serves '{model_name}'", "model",
                       "model_not_found")
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "'messages' must be a non-empty list", "messages")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise ApiError(400, f"'messages[{i}]' must be an object with string 'role' and 'content'",
                               f"messages[{i}]")
        text, field = chat_prompt(messages, tokenizer), "messages"
    else:
        text, field = body.get("prompt"), "prompt"
        if isinstance(text, list) and len(text) == 1 and isinstance(text[0], str):
            text = text[0]
        if not isinstance(text, str):
            raise ApiError(400, "'prompt' must be a string (one prompt per request)", "prompt")
    prompt = tokenizer.encode(text)
    limit = "max_completion_tokens" if chat and "max_completion_tokens" in body else "max_tokens"
    max_tokens = _number(body, limit, 16, 1, max_model_len, integer=True)
    if len(prompt) + max_tokens > max_model_len:
        raise ApiError(400, f"this model's maximum context length is {max_model_len} tokens; the request has "
                            f"{len(prompt)} prompt tokens and asks for {max_tokens} more", field,
                       "context_length_exceeded")
    if _number(body, "n", 1, 1, 2 ** 31, integer=True) != 1:
        raise ApiError(400, f"'n' must be 1 (one choice per request), got {body['n']!r}", "n")
    stop = body.get("stop") or []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or len(stop) > MAX_STOP or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, f"'stop' must be a non-empty string or a list of at most {MAX_STOP} of them", "stop")
    for key in ("stream", "ignore_eos"):
        if not isinstance(body.get(key, False), bool):
            raise ApiError(400, f"'{key}' must be a boolean, got {body[key]!r}", key)
    stream = body.get("stream", False)
    seed = _number(body, "seed", None, -(2 ** 63), 2 ** 63 - 1, integer=True)
    params = SamplingParams(max_tokens=max_tokens, temperature=float(_number(body, "temperature", 1.0, 0, 2)),
                            top_p=float(_number(body, "top_p", 1.0, 0, 1)),
                            seed=seed if seed is not None else int.from_bytes(os.urandom(7), "big"),
                            stop=stop, ignore_eos=body.get("ignore_eos", False))
    if params.top_p == 0:
        raise ApiError(400, "'top_p' must be > 0", "top_p")
    return prompt, params, stream


def build_app(router, model_name: str, tokenizer, serve_cfg, max_model_len: int, metrics: Metrics) -> FastAPI:
    app = FastAPI(title="dist serve")
    timeout_s = serve_cfg.request_timeout_s

    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.get("/health")
    async def health():
        if router.healthy:
            return {"status": "ok"}
        return JSONResponse({"status": "unavailable", "dead_workers": router.dead}, status_code=503)

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "dist", "max_model_len": max_model_len}]}

    async def body_of(request: Request):
        try:
            return json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON: {e}") from None

    def timed_out(h) -> ApiError:
        router.abort(h)
        metrics.requests.labels("timeout").inc()
        return ApiError(503, f"the request did not finish within serve.request_timeout_s = {timeout_s} s",
                        code="timeout")

    async def events(h, deadline: float):
        """The request's events until it finishes, in lists: all that arrived since the last list, so a reader
        that fell behind (a slow client, a busy event loop) catches up in one chunk, not one per token.
        ApiError(503) past the deadline or on a worker error (after the events before it)."""
        while True:
            if h.events.empty():  # wait_for costs a task and a timer: only when there is nothing to take
                try:
                    ev = await asyncio.wait_for(h.events.get(), max(0.0, deadline - time.monotonic()))
                except asyncio.TimeoutError:
                    raise timed_out(h) from None
            elif time.monotonic() > deadline:
                raise timed_out(h)
            else:
                ev = h.events.get_nowait()
            batch = []
            while True:
                if ev.finish == "error":
                    if batch:
                        yield batch
                    raise ApiError(503, ev.error, code="worker_error")
                batch.append(ev)
                if ev.finish or h.events.empty():
                    break
                ev = h.events.get_nowait()
            yield batch
            if batch[-1].finish:
                return

    async def complete(request: Request, chat: bool):
        body = await body_of(request)
        prompt, params, stream = parse_request(body, chat, model_name, tokenizer, max_model_len)
        if not router.healthy:
            raise ApiError(503, f"workers failed: {router.dead}", code="unavailable")
        h = router.submit(prompt, params)
        deadline = time.monotonic() + timeout_s
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{h.rid}"
        created = int(time.time())
        kind = "chat.completion" if chat else "text_completion"

        def choice(text, finish, first=False):
            if chat:
                delta = {"role": "assistant", "content": text} if first else {"content": text}
                return {"index": 0, "delta": delta, "finish_reason": finish}
            return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}

        if not stream:
            text, finish, tokens = [], None, 0
            try:
                async for batch in events(h, deadline):
                    text += [ev.text for ev in batch]
                    finish, tokens = batch[-1].finish, batch[-1].tokens
            finally:
                router.abort(h)  # no-op when finished; frees the request when the client left
            text = "".join(text)
            usage = {"prompt_tokens": len(prompt), "completion_tokens": tokens,
                     "total_tokens": len(prompt) + tokens}
            c = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
                 if chat else choice(text, finish))
            return {"id": rid, "object": kind, "created": created, "model": model_name, "choices": [c],
                    "usage": usage}

        async def sse():
            first = True
            try:
                async for batch in events(h, deadline):
                    text = "".join(ev.text for ev in batch)
                    chunk = {"id": rid, "object": kind + (".chunk" if chat else ""), "created": created,
                             "model": model_name, "choices": [choice(text, batch[-1].finish, first)]}
                    first = False
                    # one chunk per token while the reader keeps up; the tokens since the last chunk when it fell
                    # behind (text may wait for a whole character)
                    yield f"data: {json.dumps(chunk)}\n\n"
                yield "data: [DONE]\n\n"
            except ApiError as e:
                yield f"data: {json.dumps(e.body())}\n\n"
            finally:
                router.abort(h)

        return StreamingResponse(sse(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await complete(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await complete(request, chat=True)

    return app
