"""Loopback load test of `ptune serve`: N concurrent clients over M prompts, against one request at a time and
against offline `ptune predict` of the same inputs.

    python scripts/bench_serve.py RUN [RUN ...] [--clients 16] [--requests 600] [--seconds 60] [--max-batch 32]
                                  [--rounds 1]

RUNs are what `ptune serve` takes (run folders, or a folder of runs). Each request classifies one SST-2 dev sentence
(in file order, cycled) with prompt k mod M. Three measurements, each bounded by --requests and --seconds:

* served: `ptune serve` with dynamic batching (--max-batch, --max-wait-ms); N client threads, each with one
  keep-alive connection (a minimal raw-socket HTTP/1.1 client), send their next request as soon as the last one is
  answered;
* one at a time: the same server with --max-batch 1 --max-wait-ms 0 (every request runs alone);
* offline: `ptune.predict.predict` of the same inputs in a fresh process (length-sorted batches of --max-batch),
  model loading excluded, as the server's loading is excluded.

Reports throughput (requests/s), p50/p99 latency, the mean rows per batch and the share of the time the model was
busy (both from /metrics), and checks that the served answers agree with the offline ones (labels, largest
probability difference).

``--rounds K`` repeats the three measurements K times, interleaved (served, one at a time, offline; then again), and
reports each round's ratios and their medians: this machine's speed drifts by a quarter within minutes, so a ratio
is only as good as the nearness of its two measurements.
"""

from __future__ import annotations

import argparse
import csv
import http.client
import json
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def sentences(data: Path, n: int) -> list[str]:
    with open(data / "sst2" / "dev.tsv", encoding="utf-8") as f:
        rows = [r["sentence"].strip() for r in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)]
    return [rows[k % len(rows)] for k in range(n)]


class Served:
    def __init__(self, runs: list[str], flags: list[str]):
        env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "ptune", "serve", *runs, "--port", "0", *flags],
                                     env=env, stderr=subprocess.PIPE, text=True)
        log = []
        while True:
            line = self.proc.stderr.readline()
            if not line:
                raise SystemExit("ptune serve failed to start:\n" + "".join(log))
            log.append(line)
            m = re.search(r"http://127\.0\.0\.1:(\d+)", line)
            if m:
                self.port = int(m.group(1))
                break
        threading.Thread(target=lambda: [None for _ in self.proc.stderr], daemon=True).start()

    def get(self, path: str) -> bytes:
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        c.request("GET", path)
        body = c.getresponse().read()
        c.close()
        return body

    def models(self) -> list[str]:
        return [m["id"] for m in json.loads(self.get("/v1/models"))["data"]]

    def batch_stats(self) -> tuple[float, float, float]:
        """Rows in batches, batches, and the seconds the model worker spent on them, so far."""
        text = self.get("/metrics").decode()
        s = float(re.search(r"^ptune_serve_batch_rows_sum (\S+)", text, re.M).group(1))
        n = float(re.search(r"^ptune_serve_batch_rows_count (\S+)", text, re.M).group(1))
        busy = float(re.search(r"^ptune_serve_batch_seconds_sum (\S+)", text, re.M).group(1))
        return s, n, busy

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=120)


def post(sock: socket.socket, path: str, body: bytes) -> tuple[int, bytes]:
    """One keep-alive HTTP/1.1 POST on a raw socket: a load generator light enough to leave the 2 cores to the
    server (http.client parses every header through the email package)."""
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("the server closed the connection")
        buf += chunk
    head, rest = buf.split(b"\r\n\r\n", 1)
    length = int(re.search(rb"(?im)^content-length:\s*(\d+)", head).group(1))
    while len(rest) < length:
        rest += sock.recv(65536)
    return int(head[9:12]), rest


def load(srv: Served, jobs: list[tuple[str, str]], clients: int, seconds: float, max_tokens: int = 0) -> dict:
    """Send ``jobs`` from ``clients`` threads until all are answered or ``seconds`` have passed."""
    lock, nxt = threading.Lock(), [0]
    latencies: list[float] = []
    answers: dict[int, dict] = {}
    errors: list[str] = []
    stop_at = time.perf_counter() + seconds

    def client():
        sock = socket.create_connection(("127.0.0.1", srv.port))
        while True:
            with lock:
                k = nxt[0]
                nxt[0] += 1
            if k >= len(jobs) or time.perf_counter() > stop_at:
                break
            name, text = jobs[k]
            if max_tokens:
                path, body = "/v1/completions", json.dumps({"model": name, "prompt": text, "max_tokens": max_tokens})
            else:
                path, body = "/v1/classify", json.dumps({"model": name, "inputs": [text]})
            t0 = time.perf_counter()
            status, raw = post(sock, path, body.encode())
            dt = time.perf_counter() - t0
            if status != 200:
                errors.append(f"{status} {raw[:200]!r}")
                continue
            answer = json.loads(raw)
            with lock:
                latencies.append(dt)
                answers[k] = answer["choices"][0]["text"] if max_tokens else answer["results"][0]
        sock.close()

    s0, n0, b0 = srv.batch_stats()
    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    s1, n1, b1 = srv.batch_stats()
    lat = sorted(latencies)
    return {
        "requests": len(lat), "errors": len(errors), "first_error": errors[0] if errors else None,
        "seconds": round(wall, 2), "throughput_rps": round(len(lat) / wall, 1),
        "p50_ms": round(1000 * statistics.median(lat), 1) if lat else None,
        "p99_ms": round(1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))], 1) if lat else None,
        "mean_batch_rows": round((s1 - s0) / max(n1 - n0, 1), 2),
        # the share of the wall time the model worker was running batches: below 1, it waited for requests
        "model_busy": round((b1 - b0) / wall, 2), "answers": answers,
    }


def served_run(runs, flags, jobs, clients, seconds, max_tokens) -> dict:
    srv = Served(runs, flags)
    try:
        names = srv.models()
        jobs = [(names[int(n)], t) for n, t in jobs]
        load(srv, jobs[: 2 * len(names)], min(clients, 4), 120, max_tokens)  # warm-up
        return load(srv, jobs, clients, seconds, max_tokens)
    finally:
        srv.stop()


def offline_generate(runs: list[str], jobs, batch_size: int, max_tokens: int, threads: int
                     ) -> tuple[dict, dict[int, str]]:
    """`ptune predict --generate` of the same inputs (each prompt's rows in length-sorted batches), loading excluded."""
    sys.path.insert(0, str(REPO))
    from ptune.batching import Encoded
    from ptune.commands import quiet
    from ptune.commands.serve import expand_runs
    from ptune.config import trainer_config
    from ptune.generation import generate_texts, prompt_rows
    from ptune.inference import load_task
    from ptune.runtime import configure_threads, pick_amp, pick_device
    from ptune.token_cache import render_split

    quiet()
    configure_threads(threads)
    named = sorted(expand_runs(runs))
    out: dict[int, str] = {}
    wall = 0.0
    for n, (_, path) in enumerate(named):
        task, cfg, _, _ = load_task(path)
        tr = trainer_config(cfg)
        dev = pick_device(tr.device)
        amp = pick_amp(tr.precision, dev)
        task.model.to(dev)
        mine = [(k, t) for k, (m, t) in enumerate(jobs) if int(m) == n]
        ids, answers = render_split(task.renderer, [{"text_a": t} for _, t in mine])
        data = Encoded(prompt_rows(ids, answers), answers, [0] * len(ids))
        generate_texts(task.model, Encoded(data.input_ids[:4], answers[:4], [0] * 4), batch_size, dev, amp,
                       max_new_tokens=max_tokens)  # warm-up
        start = time.perf_counter()
        texts = generate_texts(task.model, data, batch_size, dev, amp, max_new_tokens=max_tokens)
        wall += time.perf_counter() - start
        out.update({k: t for (k, _), t in zip(mine, texts, strict=True)})
    figures = {"requests": len(out), "seconds": round(wall, 2), "throughput_rps": round(len(out) / wall, 1)}
    return figures, out


def offline(runs: list[str], jobs, batch_size: int, threads: int) -> tuple[dict, dict[int, dict]]:
    sys.path.insert(0, str(REPO))
    from ptune.commands import quiet
    from ptune.commands.serve import expand_runs
    from ptune.predict import predict
    from ptune.runtime import configure_threads
    from ptune.serving import PromptServer

    quiet()
    configure_threads(threads)
    named = expand_runs(runs)
    server = PromptServer([p for _, p in named])
    names = sorted(n for n, _ in named)  # /v1/models lists models sorted by name
    index = {n: i for i, (n, _) in enumerate(named)}
    inputs = [{"text_a": t, "checkpoint": index[names[int(n)]]} for n, t in jobs]
    predict([], inputs[:16], batch_size=batch_size, server=server)  # warm-up
    start = time.perf_counter()
    rows = predict([], inputs, batch_size=batch_size, server=server)
    wall = time.perf_counter() - start
    figures = {"requests": len(rows), "seconds": round(wall, 2), "throughput_rps": round(len(rows) / wall, 1),
               "precision": str(server.amp or "fp32")}
    return figures, {r["index"]: r for r in rows}


def compare(answers: dict[int, dict], ref: dict[int, dict]) -> dict:
    # fp32 gives the same probabilities up to ~1e-6 whatever the batch; under bf16 autocast (trainer.precision=auto on
    # a CPU with AVX512-BF16) a row's rounding depends on the batch's padded width, so report how close they are
    diffs = [max(abs(a["probs"][c] - ref[k]["probs"][c]) for c in a["probs"]) for k, a in answers.items()]
    agree = sum(a["label"] == ref[k]["label"] for k, a in answers.items())
    return {"labels_equal": f"{agree}/{len(diffs)}", "max_prob_diff": max(diffs, default=0.0)}


def one_round(args, flags: list[str], jobs: list[tuple[str, str]]) -> dict:
    """Served, one at a time, and offline, one after the other, and their ratios."""
    batched = served_run(args.runs, [*flags, "--max-batch", str(args.max_batch), "--max-wait-ms",
                                     str(args.max_wait_ms)], jobs, args.clients, args.seconds, args.completions)
    single = served_run(args.runs, [*flags, "--max-batch", "1", "--max-wait-ms", "0"], jobs, args.clients,
                        args.seconds, args.completions)
    # offline in a fresh process, as `ptune predict` runs (not beside this process's client threads)
    with tempfile.TemporaryDirectory() as tmp:
        into = Path(tmp) / "offline.json"
        subprocess.run([sys.executable, __file__, *sys.argv[1:], "--offline-into", str(into)], check=True)
        off, ref = json.loads(into.read_text())
    ref = {int(k): v for k, v in ref.items()}
    if args.completions:
        same = sum(a == ref[k] for k, a in batched["answers"].items())
        agreement = {"texts_equal": f"{same}/{len(batched['answers'])}"}
    else:
        agreement = compare(batched["answers"], ref)
    for r in (batched, single):
        r.pop("answers")
    return {
        "served": batched, "one_at_a_time": single, "offline_predict": off,
        "speedup_vs_one_at_a_time": round(batched["throughput_rps"] / single["throughput_rps"], 2),
        "fraction_of_offline": round(batched["throughput_rps"] / off["throughput_rps"], 2),
        "served_vs_offline": agreement,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=600)
    ap.add_argument("--seconds", type=float, default=60, help="time limit of each measurement")
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--max-wait-ms", type=float, default=5)
    ap.add_argument("--data", type=Path, default=Path(os.environ.get("PTUNE_DATA", "/work/shared/data")))
    ap.add_argument("--threads", type=int, default=0, help="intra-op threads, the same for all three (0: all cores)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="repeat the three measurements this many times, interleaved; report the median ratios")
    ap.add_argument("--json", type=Path, help="also write the figures to this file")
    ap.add_argument("--offline-into", type=Path, help=argparse.SUPPRESS)  # the offline measurement, in its own process
    ap.add_argument("--completions", type=int, default=0, metavar="MAX_TOKENS",
                    help="generate prompts: POST /v1/completions (greedy, this max_tokens) instead of /v1/classify")
    args = ap.parse_args()
    if args.rounds < 1:
        ap.error(f"--rounds {args.rounds} must be at least 1")
    os.environ.setdefault("PTUNE_DATA", str(args.data))
    texts = sentences(args.data, args.requests)
    from ptune.commands.serve import expand_runs

    m = len(expand_runs(args.runs))
    jobs = [(str(k % m), t) for k, t in enumerate(texts)]
    if args.offline_into:
        if args.completions:
            result = offline_generate(args.runs, jobs, args.max_batch, args.completions, args.threads)
        else:
            result = offline(args.runs, jobs, args.max_batch, args.threads)
        args.offline_into.write_text(json.dumps(result))
        return
    flags = ["--max-queue", str(4 * args.clients), "--max-inputs", "1", "--threads", str(args.threads)]
    rounds = [one_round(args, flags, jobs) for _ in range(args.rounds)]
    report = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load average "
                   f"{' '.join(f'{x:.1f}' for x in os.getloadavg())} at the end",
        "prompts": m, "clients": args.clients, "threads": args.threads or os.cpu_count(),
        "max_batch": args.max_batch, "max_wait_ms": args.max_wait_ms,
    }
    if args.rounds == 1:
        report.update(rounds[0])
    else:
        report["rounds"] = rounds
        for key in ("speedup_vs_one_at_a_time", "fraction_of_offline"):
            report[f"median_{key}"] = round(statistics.median(r[key] for r in rounds), 2)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
