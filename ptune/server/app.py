"""The HTTP application of `ptune serve`: an ASGI application (Starlette's requests and responses) run by uvicorn.

Every answer is JSON (or server-sent events for a streamed completion). Bad requests get a 4xx whose message names
the problem; an unexpected failure is a 500 with one line, never a traceback; either way the server keeps serving.
Request bodies are read and checked here (size, UTF-8, JSON, fields) rather than by a schema library, so that each
message says exactly which field is wrong and what would be valid.

Routing is a table lookup (``Router``), not a web framework's: the HTTP thread shares the CPU and the GIL with the
model, so its work per request costs served throughput. Per classify request it spent 0.26 ms of CPU under FastAPI's
routing, dependency solving and middleware, and spends 0.14 ms with the table (2-core AMD EPYC, 32 clients, the
model stubbed out).
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import json
import math
import secrets
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from ..checkpoint import find_checkpoint
from ..config import section
from ..errors import PtuneError, one_line
from ..predict import example_for
from ..serving import ServedPrompt
from .batcher import Batcher, ClassifyJob, CompleteJob, PromptGone, QueueFull
from .decode import GenRow
from .metrics import Metrics


@dataclass
class Limits:
    max_body_bytes: int = 1 << 20
    max_inputs: int = 64  # texts per request (classify inputs, completion prompts)
    max_input_chars: int = 10_000  # characters per text field (the template truncates to backbone.max_length tokens)
    max_tokens: int = 256  # /v1/completions max_tokens
    max_stop: int = 4  # stop strings per completion request


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.headers = status, message, kind, headers or {}


def error_response(status: int, message: str, kind: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status, headers=headers)


class Models:
    """The served names: name -> ServedPrompt. Changed only together with the worker's prompt list."""

    def __init__(self, named: dict[str, ServedPrompt]):
        self.named = dict(named)
        self.lock = threading.Lock()

    def get(self, name: Any) -> ServedPrompt:
        if not isinstance(name, str):
            raise ApiError(400, f'field "model" must be a string naming a served model, not {_kind(name)}')
        prompt = self.named.get(name)
        if prompt is None:
            raise ApiError(404, f"model {name!r} is not served: served models are {', '.join(sorted(self.named))}",
                           "not_found_error")
        return prompt


def describe(name: str, p: ServedPrompt) -> dict:
    tcfg = section(p.cfg, "template")
    generates = p.task.model.readout.generates_text
    return {
        "id": name, "object": "model", "owned_by": "ptune", "method": str(p.cfg.method.name),
        "readout": str(tcfg.readout), "labels": None if generates else p.label_names,
        "fields": list(dict.fromkeys(p.fields)), "endpoint": "/v1/completions" if generates else "/v1/classify",
        "checkpoint": str(p.checkpoint),
    }


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null",
            int: "a number", float: "a number"}.get(type(value), type(value).__name__)


async def read_json(request: Request, limit: int) -> dict:
    size = request.headers.get("content-length")
    if size is not None and size.isdigit() and int(size) > limit:
        raise ApiError(413, f"request body is {size} bytes: the limit is {limit} (--max-body-bytes)")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, f"request body is over {limit} bytes (--max-body-bytes)")
    try:
        text = bytes(body).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ApiError(400, f"request body is not UTF-8 text (byte 0x{body[exc.start]:02x} at offset {exc.start})"
                       ) from None
    try:
        obj = json.loads(text, parse_constant=_no_constant)
    except json.JSONDecodeError as exc:
        raise ApiError(400, f"request body is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})"
                       ) from None
    except RecursionError:
        raise ApiError(400, "request body is JSON nested too deeply to read") from None
    except ValueError as exc:  # NaN/Infinity, or an integer over Python's 4300-digit limit
        raise ApiError(400, f"request body is not valid JSON ({one_line(exc, 200)})") from None
    if not isinstance(obj, dict):
        raise ApiError(400, f"request body must be a JSON object, not {_kind(obj)}")
    return obj


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def check_fields(body: dict, allowed: set[str], required: set[str]) -> None:
    for key in body:
        if key not in allowed:
            raise ApiError(400, f"unknown field {key!r}: valid fields are {', '.join(sorted(allowed))}")
    for key in sorted(required):
        if key not in body:
            raise ApiError(400, f"missing field {key!r}")


def examples_of(prompt: ServedPrompt, inputs: Any, field_name: str, limits: Limits) -> list[dict[str, str]]:
    """Each input (a text, or an object with the template's fields) as the example the template renders."""
    if not isinstance(inputs, list):
        inputs = [inputs] if isinstance(inputs, str) else inputs
    if not isinstance(inputs, list) or not inputs:
        raise ApiError(400, f'field "{field_name}" must be a non-empty list of texts or objects, not {_kind(inputs)}')
    if len(inputs) > limits.max_inputs:
        raise ApiError(413, f'field "{field_name}" has {len(inputs)} inputs: the limit is {limits.max_inputs} per '
                            "request (--max-inputs)")
    fields = list(dict.fromkeys(prompt.fields))
    out = []
    for n, x in enumerate(inputs):
        where = f"{field_name}[{n}]"
        if isinstance(x, str):
            if len(fields) != 1:
                raise ApiError(400, f"{where} is a text, but the template of this model reads several fields "
                                    f"({', '.join(fields)}): give an object with them")
            x = {fields[0]: x}
        if not isinstance(x, dict):
            raise ApiError(400, f"{where} must be a text or an object with the fields {', '.join(fields)}, "
                                f"not {_kind(x)}")
        for key, value in x.items():
            if not isinstance(value, str | int | float) or isinstance(value, bool):
                raise ApiError(400, f"{where}.{key} must be a text, not {_kind(value)}")
            if isinstance(value, str) and len(value) > limits.max_input_chars:
                raise ApiError(413, f"{where}.{key} is {len(value)} characters long: the limit is "
                                    f"{limits.max_input_chars} characters (--max-input-chars)")
        try:
            out.append(example_for(prompt, x, where))
        except PtuneError as exc:
            raise ApiError(400, str(exc)) from None
    return out


def _number(body: dict, key: str, default: float, lo: float, hi: float, integer: bool = False) -> Any:
    value = body.get(key, default)
    if value is None:
        return default
    ok = isinstance(value, int) if integer else isinstance(value, int | float)
    if not ok or isinstance(value, bool) or not (lo <= value <= hi) or (isinstance(value, float) and
                                                                       not math.isfinite(value)):
        what = "an integer" if integer else "a number"
        raise ApiError(400, f'field "{key}" must be {what} from {lo:g} to {hi:g}, not {json.dumps(value)[:40]}')
    return value


Endpoint = Callable[..., Awaitable[Response]]


class Router:
    """The ASGI application: each request goes to the endpoint its method and path name, looked up in a table.
    ``/v1/models/NAME`` passes NAME (a served name holds no "/")."""

    def __init__(self) -> None:
        self.exact: dict[str, dict[str, Endpoint]] = {}
        self.named: dict[str, dict[str, Endpoint]] = {}  # "/v1/models/" -> method -> endpoint(request, name)

    def route(self, method: str, path: str) -> Callable[[Endpoint], Endpoint]:
        def add(fn: Endpoint) -> Endpoint:
            if path.endswith("/{name}"):
                self.named.setdefault(path[: -len("{name}")], {})[method] = fn
            else:
                self.exact.setdefault(path, {})[method] = fn
            return fn

        return add

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":  # uvicorn runs with lifespan="off"; nothing else is served
            return
        request = Request(scope, receive)
        path, method = scope["path"], scope["method"]
        kw = {}
        methods = self.exact.get(path)
        if methods is None:
            prefix, _, name = path.rpartition("/")
            methods = self.named.get(prefix + "/") if name else None
            kw = {"name": name}
        endpoint = None if methods is None else methods.get("GET" if method == "HEAD" else method)
        if endpoint is not None:
            response = await endpoint(request, **kw)
        elif methods is None:
            response = error_response(404, f"no endpoint {path}: see GET /v1/models, POST /v1/classify, "
                                           "POST /v1/completions, GET /health, GET /metrics", "invalid_request_error")
        else:
            response = error_response(405, f"method {method} is not allowed on {path}", "invalid_request_error",
                                      {"Allow": ", ".join(sorted(methods))})
        await response(scope, receive, send)


def create_app(batcher: Batcher, models: Models, limits: Limits, token: str | None, metrics: Metrics) -> Router:
    app = Router()

    def api(endpoint: str, auth: bool = True, admin: bool = False):
        """Wrap a route: bearer token, errors as JSON (never a traceback), request metrics."""

        def wrap(fn: Callable[..., Awaitable[Response]]):
            @functools.wraps(fn)
            async def route(request: Request, **kw) -> Response:
                start = time.perf_counter()
                try:
                    if admin and token is None:
                        raise ApiError(403, "changing the served models needs a token: start the server with "
                                            "--token or PTUNE_SERVE_TOKEN", "permission_error")
                    if (auth or admin) and token is not None:
                        given = request.headers.get("authorization", "")
                        scheme, _, value = given.partition(" ")
                        if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(),
                                                                                  token.encode()):
                            raise ApiError(401, "missing or wrong bearer token (Authorization: Bearer TOKEN)",
                                           "authentication_error", {"WWW-Authenticate": "Bearer"})
                    response = await fn(request, **kw)
                except ApiError as exc:
                    response = error_response(exc.status, exc.message, exc.kind, exc.headers)
                except Exception as exc:  # a bug: one line, and the server goes on
                    response = error_response(500, f"internal error: {type(exc).__name__}: {one_line(exc, 300)}",
                                              "server_error")
                metrics.request(endpoint, response.status_code, time.perf_counter() - start)
                return response

            return route

        return wrap

    @app.route("GET", "/health")
    @api("/health", auth=False)
    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "models": len(models.named), "pending": batcher.pending})

    @app.route("GET", "/metrics")
    @api("/metrics")
    async def metrics_text(request: Request) -> Response:
        gauges = {
            "ptune_serve_queue_depth": ("Requests waiting for a batch.", lambda: batcher.waiting),
            "ptune_serve_pending_requests": ("Requests accepted and not yet answered.", lambda: batcher.pending),
            "ptune_serve_models": ("Prompts served.", lambda: len(models.named)),
        }
        return PlainTextResponse(metrics.text(gauges), media_type="text/plain; version=0.0.4")

    @app.route("GET", "/v1/models")
    @api("/v1/models")
    async def list_models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [describe(n, p) for n, p in sorted(models.named.items())]})

    @app.route("POST", "/v1/models")
    @api("/v1/models:add", admin=True)
    async def add_model(request: Request) -> Response:
        body = await read_json(request, limits.max_body_bytes)
        check_fields(body, {"name", "path"}, {"name", "path"})
        name, path = body["name"], body["path"]
        if not isinstance(name, str) or not name or "/" in name or len(name) > 200:
            raise ApiError(400, 'field "name" must be a non-empty text without "/" (at most 200 characters)')
        if not isinstance(path, str):
            raise ApiError(400, f'field "path" must be a text (a run folder or checkpoint/ folder), not {_kind(path)}')
        if name in models.named:
            raise ApiError(409, f"model {name!r} is already served: DELETE /v1/models/{name} first", "conflict_error")
        try:
            await asyncio.to_thread(find_checkpoint, path)
        except PtuneError as exc:
            raise ApiError(400, str(exc)) from None
        try:
            prompt = await asyncio.wrap_future(batcher.control(lambda s: s.add_checkpoint(path, name)))
        except PtuneError as exc:
            raise ApiError(409, str(exc), "conflict_error") from None
        with models.lock:
            if name in models.named:  # two adds of one name raced: keep the first
                batcher.control(lambda s: s.remove(prompt))
                raise ApiError(409, f"model {name!r} is already served", "conflict_error")
            models.named[name] = prompt
        return JSONResponse(describe(name, prompt), 201)

    @app.route("DELETE", "/v1/models/{name}")
    @api("/v1/models:delete", admin=True)
    async def delete_model(request: Request, name: str) -> Response:
        with models.lock:
            prompt = models.get(name)
            if len(models.named) == 1:
                raise ApiError(409, f"model {name!r} is the only one served: a server keeps at least one",
                               "conflict_error")
            del models.named[name]  # new requests no longer find it; those accepted before are answered first
            done = batcher.control(lambda s: s.remove(prompt))
        await asyncio.wrap_future(done)
        return JSONResponse({"id": name, "object": "model", "deleted": True})

    async def answer(future) -> Any:
        try:
            return await asyncio.wrap_future(future)
        except PromptGone as exc:
            raise ApiError(404, f"model {exc} was removed before this request ran", "not_found_error") from None
        except PtuneError as exc:
            raise ApiError(400, str(exc)) from None

    def submit(job) -> Any:
        try:
            return batcher.submit(job)
        except QueueFull:
            raise ApiError(503, f"the server is busy: {batcher.max_queue} requests are waiting (--max-queue); "
                                "retry later", "overloaded_error", {"Retry-After": "1"}) from None

    @app.route("POST", "/v1/classify")
    @api("/v1/classify")
    async def classify(request: Request) -> Response:
        body = await read_json(request, limits.max_body_bytes)
        check_fields(body, {"model", "inputs"}, {"model", "inputs"})
        prompt = models.get(body["model"])
        if prompt.task.model.readout.generates_text:
            raise ApiError(400, f"model {body['model']!r} writes text (template.readout=generate): use "
                                "POST /v1/completions")
        examples = examples_of(prompt, body["inputs"], "inputs", limits)
        rows = await answer(submit(ClassifyJob(prompt, examples)))
        return JSONResponse({"object": "classification", "model": body["model"],
                             "results": [{"index": n, **r} for n, r in enumerate(rows)]})

    @app.route("POST", "/v1/completions")
    @api("/v1/completions")
    async def completions(request: Request) -> Response:
        body = await read_json(request, limits.max_body_bytes)
        check_fields(body, {"model", "prompt", "max_tokens", "temperature", "top_p", "seed", "stop", "stream", "n",
                            "user"}, {"model", "prompt"})
        name = body["model"]
        prompt = models.get(name)
        readout = prompt.task.model.readout
        if not readout.generates_text:
            raise ApiError(400, f"model {name!r} is a classifier (template.readout={readout.name}): use "
                                "POST /v1/classify")
        examples = examples_of(prompt, body["prompt"], "prompt", limits)
        default = min(int(readout.settings["max_new_tokens"]), limits.max_tokens)
        max_tokens = _number(body, "max_tokens", default, 1, limits.max_tokens, integer=True)
        temperature = float(_number(body, "temperature", 0.0, 0.0, 2.0))
        top_p = float(_number(body, "top_p", 1.0, 1e-6, 1.0))
        seed = _number(body, "seed", secrets.randbelow(2**31), 0, 2**63 - 1, integer=True)
        _number(body, "n", 1, 1, 1, integer=True)
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or len(stop) > limits.max_stop or not all(
                isinstance(s, str) and s for s in stop):
            raise ApiError(400, f'field "stop" must be a text or a list of at most {limits.max_stop} non-empty texts')
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise ApiError(400, f'field "stream" must be true or false, not {_kind(stream)}')
        ident, created = f"cmpl-{secrets.token_hex(12)}", int(time.time())
        rows = [GenRow([], max_tokens, temperature, top_p, seed + n, list(stop)) for n in range(len(examples))]
        head = {"id": ident, "object": "text_completion", "created": created, "model": name}
        if not stream:
            done = await answer(submit(CompleteJob(prompt, examples, rows)))
            return JSONResponse({
                **head,
                "choices": [{"text": r.text, "index": n, "logprobs": None, "finish_reason": r.finish}
                            for n, r in enumerate(done)],
                "usage": {"prompt_tokens": sum(len(r.ids) for r in done),
                          "completion_tokens": sum(len(r.tokens) for r in done),
                          "total_tokens": sum(len(r.ids) + len(r.tokens) for r in done)},
            })
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        for n, r in enumerate(rows):
            r.emit = functools.partial(lambda n, text, finish: loop.call_soon_threadsafe(
                events.put_nowait, (n, text, finish)), n)
        future = submit(CompleteJob(prompt, examples, rows))
        future.add_done_callback(lambda _: loop.call_soon_threadsafe(events.put_nowait, None))

        async def sse():
            while True:
                item = await events.get()
                if item is None:
                    break
                n, text, finish = item
                chunk = {**head, "choices": [{"text": text, "index": n, "logprobs": None, "finish_reason": finish}]}
                yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
            exc = future.exception()
            if exc is not None:
                error = {"message": f"{type(exc).__name__}: {one_line(exc, 300)}", "type": "server_error"}
                yield f"data: {json.dumps({'error': error}, ensure_ascii=False)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    return app


def checkpoint_name(path: str) -> str:
    """The name a run is served under: its run folder's name (the parent of a checkpoint/ folder)."""
    p = Path(path).resolve()
    return p.parent.name if p.name in ("checkpoint", ".checkpoint.old") else p.name
