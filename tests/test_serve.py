"""`ptune serve`: a real server process on a free loopback port, spoken to over HTTP (stdlib only).

One module-scoped server over four prompts of one tiny BERT (soft prompt, P-tuning v1, v2 and prefix tuning) answers
most tests; a second one (tiny queue, long batch wait) checks the 503 and the SIGTERM drain; a third, on a tiny
Llama, the completions. Answers are compared with ``ptune predict`` on the same inputs.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from ptune.predict import predict, predict_generate

from .helpers import REPO_ROOT, SENTENCES, make_cfg
from .test_serving import PROMPTS, save_prompt

TOKEN = "s3cret-token"


class Server:
    """A `python -m ptune serve` process; ``request`` talks to it with http.client."""

    def __init__(self, args: list[str], cwd: Path, env_extra: dict | None = None):
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1", **(env_extra or {})}
        self.proc = subprocess.Popen([sys.executable, "-m", "ptune", "serve", *args, "--port", "0"], cwd=cwd, env=env,
                                     stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.log: list[str] = []
        deadline = time.monotonic() + 120
        self.port = None
        while self.port is None:
            line = self.proc.stderr.readline()
            if not line:
                raise AssertionError(f"ptune serve exited before listening: {''.join(self.log)}")
            self.log.append(line)
            m = re.search(r"http://127\.0\.0\.1:(\d+)", line)
            if m:
                self.port = int(m.group(1))
            assert time.monotonic() < deadline, "".join(self.log)
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        for line in self.proc.stderr:
            self.log.append(line)

    def request(self, method: str, path: str, body=None, token: str | None = TOKEN, headers: dict | None = None,
                timeout: float = 60) -> tuple[int, dict, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        data = body if isinstance(body, bytes | type(None)) else json.dumps(body).encode()
        h = {"Content-Type": "application/json", **(headers or {})}
        if token is not None:
            h["Authorization"] = f"Bearer {token}"
        conn.request(method, path, body=data, headers=h)
        res = conn.getresponse()
        out = (res.status, dict(res.getheaders()), res.read())
        conn.close()
        return out

    def json(self, method: str, path: str, body=None, **kw) -> tuple[int, dict]:
        status, _, raw = self.request(method, path, body, **kw)
        return status, json.loads(raw)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=60)


def bert_prompts(tiny_models, root: Path) -> dict[str, Path]:
    out = {}
    for seed, (name, method, kw) in enumerate(PROMPTS["bert"]):
        cfg = make_cfg(tiny_models["bert"], method, extra=["backbone.dtype=float32"], **kw)
        out[name] = save_prompt(root, name, cfg, seed)
    return out


@pytest.fixture(scope="module")
def bert_runs(tiny_models, tmp_path_factory) -> dict[str, Path]:
    return bert_prompts(tiny_models, tmp_path_factory.mktemp("serve_runs"))


@pytest.fixture(scope="module")
def server(bert_runs, tmp_path_factory):
    """The four BERT prompts served from their folder of runs; batches wait up to 100 ms so that concurrent
    requests really share batches."""
    srv = Server([str(next(iter(bert_runs.values())).parent), "--token", TOKEN, "--max-wait-ms", "100",
                  "--max-batch", "16", "--max-inputs", "8", "--max-input-chars", "500", "--max-body-bytes", "20000"],
                 cwd=tmp_path_factory.mktemp("serve_cwd"))
    yield srv
    assert srv.stop() == 0, "".join(srv.log)


def reference(runs: dict[str, Path]) -> dict[tuple[str, str], dict]:
    """``ptune predict``'s row for every (prompt, sentence)."""
    paths = [str(p) for p in runs.values()]
    rows = predict(paths, [{"text_a": s} for s in SENTENCES])
    names = {str(p): n for n, p in runs.items()}
    return {(names[r["checkpoint"]], SENTENCES[r["index"]]): r for r in rows}


def assert_same(got: dict, ref: dict) -> None:
    assert got["label"] == ref["label"] and got["label_name"] == ref["label_name"]
    assert list(got["probs"]) == list(ref["probs"])
    assert list(got["probs"].values()) == pytest.approx(list(ref["probs"].values()), abs=2e-6)


def test_models_lists_every_prompt(server):
    status, body = server.json("GET", "/v1/models")
    assert status == 200
    got = {m["id"]: m for m in body["data"]}
    assert set(got) == {name for name, _, _ in PROMPTS["bert"]}
    assert {m["method"] for m in got.values()} == {"soft_prompt", "ptuning_v1", "ptuning_v2", "prefix"}
    assert got["prefix5_head"]["readout"] == "head" and got["soft4"]["labels"] == ["negative", "positive"]
    status, body = server.json("GET", "/health", token=None)
    assert status == 200 and body["status"] == "ok" and body["models"] == 4


def test_concurrent_mixed_requests_equal_predict(server, bert_runs):
    ref = reference(bert_runs)
    names = list(bert_runs)
    jobs = [(names[k % 4], SENTENCES[k % 6: k % 6 + 1 + k % 3]) for k in range(24)]  # 24 requests, 1-3 inputs

    def ask(job):
        name, texts = job
        return server.json("POST", "/v1/classify", {"model": name, "inputs": texts})

    before = _metric(server, "ptune_serve_batch_rows_count")
    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(ask, jobs))
    for (name, texts), (status, body) in zip(jobs, answers, strict=True):
        assert status == 200, body
        assert body["model"] == name and [r["index"] for r in body["results"]] == list(range(len(texts)))
        for text, row in zip(texts, body["results"], strict=True):
            assert_same(row, ref[(name, text)])
    batches = _metric(server, "ptune_serve_batch_rows_count") - before
    assert batches < len(jobs)  # requests were gathered into shared (mixed) batches
    # one input as a plain text or as an object of the template's fields (or the data set's column name)
    status, body = server.json("POST", "/v1/classify", {"model": "v2_len3", "inputs": [{"text": SENTENCES[2]}]})
    assert status == 200 and body["results"][0]["probs"] == ref[("v2_len3", SENTENCES[2])]["probs"]


def _metric(server, name: str) -> float:
    status, _, raw = server.request("GET", "/metrics")
    assert status == 200
    for line in raw.decode().splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")
