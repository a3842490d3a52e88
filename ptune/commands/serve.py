"""`ptune serve RUN [name=RUN ...]`: serve prompt checkpoints of one backbone over HTTP (ptune/server/).

A RUN is a run folder, its checkpoint/ folder, or a folder holding run folders (each served under its folder name);
``name=RUN`` names it. Everything given on the command line is checked before the backbone loads.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
from pathlib import Path

from ..errors import PtuneError

TOKEN_ENV = "PTUNE_SERVE_TOKEN"


def expand_runs(specs: list[str]) -> list[tuple[str, str]]:
    """(name, checkpoint path) for every RUN or name=RUN; a folder of runs gives each of its runs."""
    from ..checkpoint import find_checkpoint
    from ..server.app import checkpoint_name

    out: list[tuple[str, str]] = []
    for spec in specs:
        name, eq, path = spec.partition("=")
        if not eq:
            name, path = "", spec
        elif not name or "/" in name:
            raise PtuneError(f"{spec!r}: give RUN or NAME=RUN, with a NAME without '/'")
        try:
            find_checkpoint(path)
            out.append((name or checkpoint_name(path), path))
            continue
        except PtuneError:
            if not Path(path).is_dir():
                raise
        runs = []
        for child in sorted(Path(path).iterdir()):
            try:
                find_checkpoint(child)
            except PtuneError:
                continue
            runs.append((child.name, str(child)))
        if not runs:
            raise PtuneError(f"no checkpoint at {path!r} nor in its subfolders: give run folders, checkpoint/ "
                             "folders, or a folder of run folders")
        if name:
            raise PtuneError(f"{spec!r}: {path!r} is a folder of {len(runs)} runs; a name can only be given to one run")
        out += runs
    seen: dict[str, str] = {}
    for name, path in out:
        if name in seen:
            raise PtuneError(f"two runs would be served as {name!r} ({seen[name]!r} and {path!r}): name them with "
                             "NAME=RUN")
        seen[name] = path
    return out


def _positive(flag: str, value: int) -> None:
    if value <= 0:
        raise PtuneError(f"{flag} {value} must be > 0")


def serve_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="ptune serve",
        description="Serve prompt checkpoints of one backbone over HTTP, in dynamically batched mixed batches.",
    )
    parser.add_argument("runs", nargs="+",
                        help="run folders, checkpoint/ folders or folders of runs; NAME=RUN names one")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    parser.add_argument("--token", default=None,
                        help=f"bearer token every request but GET /health must carry (default: ${TOKEN_ENV}); "
                             "needed to add or remove models")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None)
    parser.add_argument("--threads", type=int, default=0,
                        help="intra-op threads of the model (default 0: every allowed core, as trainer.num_threads)")
    parser.add_argument("--max-batch", type=int, default=32, help="rows per batch the model runs (default 32)")
    parser.add_argument("--max-wait-ms", type=float, default=5.0,
                        help="how long the first request of a batch waits for others (default 5 ms)")
    parser.add_argument("--max-queue", type=int, default=256,
                        help="requests accepted and unanswered before 503 (default 256)")
    parser.add_argument("--max-body-bytes", type=int, default=1 << 20, help="request body limit (default 1 MiB)")
    parser.add_argument("--max-inputs", type=int, default=64, help="inputs (or prompts) per request (default 64)")
    parser.add_argument("--max-input-chars", type=int, default=10_000,
                        help="characters per input text field (default 10000)")
    parser.add_argument("--max-tokens", type=int, default=256, help="largest max_tokens of a completion (default 256)")
    args = parser.parse_args(argv)
    for flag in ("max_batch", "max_queue", "max_body_bytes", "max_inputs", "max_input_chars", "max_tokens"):
        _positive("--" + flag.replace("_", "-"), getattr(args, flag))
    if args.threads < 0:
        raise PtuneError(f"--threads {args.threads} must be >= 0 (0: every allowed core)")
    if args.max_wait_ms < 0:
        raise PtuneError(f"--max-wait-ms {args.max_wait_ms:g} must be >= 0")
    if not 0 <= args.port <= 65535:
        raise PtuneError(f"--port {args.port} is not a port: give 0 to 65535")
    token = args.token if args.token is not None else os.environ.get(TOKEN_ENV) or None
    if token is not None and not token.strip():
        raise PtuneError("--token is empty: give a token, or leave it out to serve without one")
    runs = expand_runs(args.runs)
    try:
        sock = socket.create_server((args.host, args.port))
    except (OSError, OverflowError) as exc:
        raise PtuneError(f"cannot listen on {args.host}:{args.port}: {getattr(exc, 'strerror', None) or exc}"
                         ) from None
    _serve(args, runs, token, sock)


def _serve(args, runs: list[tuple[str, str]], token: str | None, sock: socket.socket) -> None:
    import asyncio

    import uvicorn

    from ..runtime import configure_threads
    from ..server.app import Limits, Models, create_app
    from ..server.batcher import Batcher
    from ..server.metrics import Metrics
    from ..serving import PromptServer

    threads = configure_threads(args.threads)
    server = PromptServer([p for _, p in runs], device=args.device)
    for (name, _), prompt in zip(runs, server.prompts, strict=True):
        prompt.name = name  # what error messages call it: the served name, not a path on the server
    models = Models({p.name: p for p in server.prompts})
    metrics = Metrics()
    batcher = Batcher(server, metrics, args.max_batch, args.max_wait_ms / 1000, args.max_queue)
    limits = Limits(args.max_body_bytes, args.max_inputs, args.max_input_chars, args.max_tokens)
    app = create_app(batcher, models, limits, token, metrics)
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                            timeout_graceful_shutdown=60)
    web = uvicorn.Server(config)
    # uvicorn drains on SIGTERM/SIGINT, then raises the signal again for the handler found at start: a no-op one
    # makes a drained shutdown exit 0 instead of dying of the signal
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    auth = "bearer token required" if token else "no token"
    print(f"ptune serve: {len(runs)} model(s) ({', '.join(n for n, _ in runs)}) on http://{shown}:{port} ({auth}, "
          f"device {server.device.type}, {threads} thread(s))", file=sys.stderr, flush=True)
    if host not in ("127.0.0.1", "::1", "localhost"):
        print(f"ptune serve: warning: listening on {host}, reachable from other machines", file=sys.stderr, flush=True)
    try:
        asyncio.run(web.serve(sockets=[sock]))
    finally:
        batcher.stop(timeout=60)
    print("ptune serve: stopped", file=sys.stderr, flush=True)
