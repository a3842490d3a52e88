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
    """Load, then run the model in the main thread and uvicorn in a thread of its own.

    Why this way round: torch's intra-op pool (OpenMP) runs the ops of the process's main thread on every core,
    while the same batches called from another thread ran 25-30% slower on a 2-core CPU (287 against 212 rows/s of
    MiniLM, 8 mixed prompts, batches of 64 arrivals; element-wise ops ran 2-3x slower). The event loop only parses
    and answers, and uvicorn runs in a thread as it does in the main one, less its own signal handlers: SIGTERM and
    SIGINT are caught here and ask it to drain (a second SIGINT stops it at once)."""
    import threading

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
    batcher = Batcher(server, metrics, args.max_batch, args.max_wait_ms / 1000, args.max_queue, thread=False,
                      freeze_gc=True)
    limits = Limits(args.max_body_bytes, args.max_inputs, args.max_input_chars, args.max_tokens)
    app = create_app(batcher, models, limits, token, metrics)
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                            timeout_graceful_shutdown=60)
    web = uvicorn.Server(config)
    failed: list[BaseException] = []

    def http() -> None:
        try:
            web.run(sockets=[sock])  # returns once every request in flight is answered (the model still runs)
        except BaseException as exc:  # raised again in the main thread
            failed.append(exc)
        finally:
            batcher.stop()

    def drain(sig: int, _frame) -> None:
        if web.should_exit and sig == signal.SIGINT:
            web.force_exit = True
        web.should_exit = True

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, drain)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    auth = "bearer token required" if token else "no token"
    print(f"ptune serve: {len(runs)} model(s) ({', '.join(n for n, _ in runs)}) on http://{shown}:{port} ({auth}, "
          f"device {server.device.type}, {threads} thread(s))", file=sys.stderr, flush=True)
    if host not in ("127.0.0.1", "::1", "localhost"):
        print(f"ptune serve: warning: listening on {host}, reachable from other machines", file=sys.stderr, flush=True)
    web_thread = threading.Thread(target=http, name="ptune-serve-http", daemon=True)
    web_thread.start()
    batcher.run()  # until http() stops it
    web_thread.join()
    if failed:
        raise failed[0]
    print("ptune serve: stopped", file=sys.stderr, flush=True)
