"""`ptune serve`: a real server process on a free loopback port, spoken to over HTTP (stdlib only).

One module-scoped server over four prompts of one tiny BERT (soft prompt, P-tuning v1, v2 and prefix tuning) answers
most tests; a second one (tiny queue, long batch wait) checks the 503 and the SIGTERM drain; a third, on a tiny
Llama, the completions (a soft prompt, P-tuning v2 and prefix tuning, decoded in mixed batches). Answers are compared
with ``ptune predict`` on the same inputs.
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
import torch
from omegaconf import OmegaConf

from ptune.generation import _Decoder, collate_prompts, prompt_rows
from ptune.predict import predict, predict_generate
from ptune.runtime import autocast
from ptune.server.batcher import Batcher, CompleteJob
from ptune.server.decode import GenRow, _prompt_inputs, decode_rows
from ptune.server.metrics import Metrics
from ptune.serving import PromptServer
from ptune.token_cache import render_split
from ptune.tuners import deep_attention as da

from .helpers import REPO_ROOT, SENTENCES, close, make_cfg
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
        out = (res.status, {k.lower(): v for k, v in res.getheaders()}, res.read())
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


BAD = [  # (method, path, body, status, words the message must hold)
    ("POST", "/v1/classify", b'{"model": "soft4", "inputs": ["fine"', 400, "not valid JSON"),
    ("POST", "/v1/classify", b'{"model": "soft4", "inputs": ["\xff\xfe bad"]}', 400, "not UTF-8"),
    ("POST", "/v1/classify", b'["soft4"]', 400, "must be a JSON object"),
    ("POST", "/v1/classify", {"inputs": ["fine"]}, 400, "missing field 'model'"),
    ("POST", "/v1/classify", {"model": "soft4", "input": ["fine"]}, 400, "unknown field 'input'"),
    ("POST", "/v1/classify", {"model": "soft4", "inputs": "fine", "x": 1}, 400, "unknown field 'x'"),
    ("POST", "/v1/classify", {"model": 3, "inputs": ["fine"]}, 400, '"model" must be a string'),
    ("POST", "/v1/classify", {"model": "nope", "inputs": ["fine"]}, 404, "model 'nope' is not served"),
    ("POST", "/v1/classify", {"model": "soft4", "inputs": []}, 400, '"inputs" must be a non-empty list'),
    ("POST", "/v1/classify", {"model": "soft4", "inputs": [["fine"]]}, 400, "inputs[0] must be a text or an object"),
    ("POST", "/v1/classify", {"model": "soft4", "inputs": [{"review": "x"}]}, 400,
     "inputs[0]: no field 'text_a' for checkpoint 'soft4'"),
    ("POST", "/v1/classify", {"model": "soft4", "inputs": [{"text_a": None}]}, 400, "inputs[0].text_a must be a text"),
    ("POST", "/v1/classify", {"model": "soft4", "inputs": ["ok", "x" * 501]}, 413, "inputs[1].text_a is 501"),
    ("POST", "/v1/classify", {"model": "soft4", "inputs": ["ok"] * 9}, 413, "9 inputs: the limit is 8"),
    ("POST", "/v1/classify", {"model": "soft4", "inputs": ["a" * 400] * 60}, 413, "the limit is 20000"),
    ("POST", "/v1/completions", {"model": "soft4", "prompt": "hi"}, 400, "use POST /v1/classify"),
    ("GET", "/v1/nothing", None, 404, "no endpoint /v1/nothing"),
    ("GET", "/v1/classify", None, 405, "method GET is not allowed"),
    ("GET", "/v1/models/soft4", None, 405, "method GET is not allowed on /v1/models/soft4"),
    ("DELETE", "/v1/models/soft4/x", None, 404, "no endpoint /v1/models/soft4/x"),
    ("GET", "/health/", None, 404, "no endpoint /health/"),
    ("DELETE", "/v1/models/nope", None, 404, "model 'nope' is not served"),
]


@pytest.mark.parametrize(("method", "path", "body", "status", "words"), BAD, ids=[b[4][:24] for b in BAD])
def test_bad_request_gets_its_4xx_and_the_server_goes_on(server, method, path, body, status, words):
    got, headers, raw = server.request(method, path, body)
    assert got == status, raw
    error = json.loads(raw)["error"]
    assert words in error["message"] and error["code"] == status
    assert "Traceback" not in raw.decode()
    ok, body = server.json("POST", "/v1/classify", {"model": "soft4", "inputs": ["still here"]})
    assert ok == 200 and body["results"][0]["label_name"] in ("negative", "positive")


def test_bearer_token(server):
    for token in (None, "wrong"):
        status, headers, raw = server.request("POST", "/v1/classify", {"model": "soft4", "inputs": ["x"]},
                                              token=token)
        assert status == 401 and headers.get("www-authenticate") == "Bearer", raw
        assert "bearer token" in json.loads(raw)["error"]["message"]
        assert server.request("GET", "/v1/models", token=token)[0] == 401
    assert server.request("GET", "/health", token=None)[0] == 200
    assert server.request("GET", "/v1/models")[0] == 200


def test_metrics_are_prometheus_text(server):
    server.request("POST", "/v1/classify", b"{", token=TOKEN)
    status, headers, raw = server.request("GET", "/metrics")
    text = raw.decode()
    assert status == 200 and headers["content-type"].startswith("text/plain")
    for name in ("ptune_serve_requests_total", "ptune_serve_errors_total", "ptune_serve_queue_depth",
                 "ptune_serve_batch_rows", "ptune_serve_request_seconds", "ptune_serve_batch_seconds"):
        assert f"# TYPE {name} " in text
    assert re.search(r'ptune_serve_requests_total\{endpoint="/v1/classify",code="400"\} [1-9]', text)
    assert re.search(r'ptune_serve_errors_total\{code="400"\} [1-9]', text)
    assert 'ptune_serve_request_seconds_bucket{endpoint="/v1/classify",le="+Inf"}' in text
    # the model worker's time per gathered batch (the module's server has run batches by now)
    assert int(re.search(r"^ptune_serve_batch_seconds_count (\d+)", text, re.M).group(1)) > 0
    assert float(re.search(r"^ptune_serve_batch_seconds_sum (\S+)", text, re.M).group(1)) > 0


def test_models_added_and_removed_while_serving(server, bert_runs, tiny_models, tmp_path):
    extra = save_prompt(tmp_path, "extra", make_cfg(tiny_models["bert"], "ptuning_v2", prompt_length=2,
                                                    extra=["backbone.dtype=float32"]), seed=7)
    ref = reference({**bert_runs, "extra": extra})
    stop = threading.Event()
    seen: list[tuple[int, dict]] = []

    def traffic():  # requests in flight the whole time, on the prompts that stay
        while not stop.is_set():
            seen.append(server.json("POST", "/v1/classify", {"model": "v1_middle", "inputs": SENTENCES[:3]}))

    threads = [threading.Thread(target=traffic) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        status, body = server.json("POST", "/v1/models", {"name": "extra", "path": str(extra)}, token=None)
        assert status == 401  # no admin without the token
        status, body = server.json("POST", "/v1/models", {"name": "extra", "path": str(extra)})
        assert status == 201 and body["id"] == "extra" and body["method"] == "ptuning_v2", body
        status, body = server.json("POST", "/v1/classify", {"model": "extra", "inputs": SENTENCES})
        assert status == 200
        for text, row in zip(SENTENCES, body["results"], strict=True):
            assert_same(row, ref[("extra", text)])
        status, body = server.json("POST", "/v1/models", {"name": "extra", "path": str(extra)})
        assert status == 409 and "already served" in body["error"]["message"]
        other = save_prompt(tmp_path, "gpt2", make_cfg(tiny_models["gpt2"], "soft_prompt", prompt_length=2,
                                                       family="causal"))
        status, body = server.json("POST", "/v1/models", {"name": "gpt2", "path": str(other)})
        assert status == 409 and "different backbone" in body["error"]["message"], body
        status, body = server.json("POST", "/v1/models", {"name": "x", "path": str(tmp_path / "none")})
        assert status == 400 and "no checkpoint" in body["error"]["message"]
        status, body = server.json("DELETE", "/v1/models/extra")
        assert status == 200 and body["deleted"] is True
        status, body = server.json("POST", "/v1/classify", {"model": "extra", "inputs": ["x"]})
        assert status == 404
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert seen and all(s == 200 for s, _ in seen)
    for _, body in seen:
        for text, row in zip(SENTENCES[:3], body["results"], strict=True):
            assert_same(row, ref[("v1_middle", text)])
    status, body = server.json("GET", "/v1/models")
    assert {m["id"] for m in body["data"]} == {name for name, _, _ in PROMPTS["bert"]}


def test_full_queue_gives_503_and_sigterm_drains(bert_runs, tmp_path):
    """--max-queue 1 and a batch that waits 1.5 s for company: a second request meanwhile is refused with 503 and
    Retry-After; a DELETE of the model the first request names waits for that request's batch (it is answered with
    the model); SIGTERM during all this lets both finish and the process exits 0."""
    ref = reference(bert_runs)
    srv = Server([f"a={bert_runs['soft4']}", f"b={bert_runs['v2_len3']}", "--max-queue", "1", "--max-wait-ms", "1500",
                  "--token", TOKEN], cwd=tmp_path)
    try:
        first: list = []
        deleted: list = []
        t = threading.Thread(target=lambda: first.append(
            srv.json("POST", "/v1/classify", {"model": "b", "inputs": [SENTENCES[0]]})))
        t.start()
        time.sleep(0.5)
        status, headers, raw = srv.request("POST", "/v1/classify", {"model": "a", "inputs": ["x"]})
        assert status == 503 and headers.get("retry-after") == "1", raw
        assert "--max-queue" in json.loads(raw)["error"]["message"]
        d = threading.Thread(target=lambda: deleted.append(srv.json("DELETE", "/v1/models/b")))
        d.start()
        time.sleep(0.2)
        srv.proc.send_signal(signal.SIGTERM)
        t.join(30)
        d.join(30)
        assert first and first[0][0] == 200, first
        assert_same(first[0][1]["results"][0], ref[("v2_len3", SENTENCES[0])])
        assert deleted and deleted[0][0] == 200, deleted
        assert srv.proc.wait(timeout=60) == 0, "".join(srv.log)
    finally:
        if srv.proc.poll() is None:
            srv.proc.kill()


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads the server's threads from Linux's /proc")
def test_an_idle_server_stops_on_sigterm_whichever_thread_receives_it(bert_runs, tmp_path):
    """The kernel hands a process's signal to any of its threads. Python runs the handler only in the main thread,
    which an idle server spends waiting for work: given to another thread (uvicorn's, torch's), SIGTERM was left
    unhandled until a request came, and an idle ``ptune serve`` never stopped (2 of 8 stops of a generate server
    hung). ``kill`` of a thread's id hands the signal to that thread, so each one is tried here."""
    srv = Server([str(bert_runs["soft4"])], cwd=tmp_path)
    try:
        assert srv.json("POST", "/v1/classify", {"model": "soft4", "inputs": ["fine"]}, token=None)[0] == 200
        time.sleep(0.5)  # the worker, answered, waits for the next request
        main = srv.proc.pid
        others = sorted(int(t) for t in os.listdir(f"/proc/{main}/task") if int(t) != main)
        assert others  # uvicorn's thread at least
        os.kill(others[0], signal.SIGTERM)  # the kill of a thread id prefers that thread
        assert srv.proc.wait(timeout=30) == 0, "".join(srv.log)
    finally:
        if srv.proc.poll() is None:
            srv.proc.kill()


GENERATE = {"readout": "generate", "text": "{text_a} It was {mask}", "max_target_length": 6,
            "label_words": {"negative": ["terrible"], "positive": ["great"]}}
# generate prompts of every kind on one tiny Llama: soft slots of different counts, deep prefixes of different
# lengths (3 and 6: the mixed decode pads and masks), templates of different lengths
GEN_PROMPTS = (("deep", "ptuning_v2", 3, None), ("soft", "soft_prompt", 3, None),
               ("prefix", "prefix", 6, "Text: {text_a} Mood: {mask}"), ("v1", "ptuning_v1", 2, None))


def gen_prompts(tiny_models, root: Path, names=("deep", "soft", "prefix"), kind: str = "llama") -> dict[str, Path]:
    runs = {}
    family = "seq2seq" if kind == "t5" else "causal"
    for seed, (name, method, length, text) in enumerate(GEN_PROMPTS):
        if name not in names:
            continue
        cfg = make_cfg(tiny_models[kind], method, family=family, prompt_length=length,
                       extra=["backbone.dtype=float32"])
        text = text or GENERATE["text"]
        cfg.template = OmegaConf.create({**GENERATE, "text": text + "." if family == "seq2seq" else text})
        runs[name] = save_prompt(root, name, cfg, seed)
    return runs


@pytest.fixture(scope="module")
def gen_server(tiny_models, tmp_path_factory):
    """Three generate prompts (P-tuning v2, a soft prompt, prefix tuning) on a tiny Llama."""
    root = tmp_path_factory.mktemp("gen_runs")
    runs = gen_prompts(tiny_models, root)
    srv = Server([f"{n}={p}" for n, p in runs.items()] + ["--max-wait-ms", "100", "--max-tokens", "16"],
                 cwd=root)
    yield srv, runs
    assert srv.stop() == 0, "".join(srv.log)


def _decode_histogram(srv) -> tuple[float, float]:
    """(decode batches, decode batches of one prompt) so far."""
    return _metric(srv, "ptune_serve_decode_prompts_count"), _metric(srv, 'ptune_serve_decode_prompts_bucket{le="1"}')


def test_greedy_completions_equal_predict_generate(gen_server):
    """Concurrent completions for three prompts: each text is ``ptune predict --generate``'s, and rows of different
    prompts decode in one batch (the decode histogram of /metrics)."""
    srv, runs = gen_server
    expected = {}
    for name, path in runs.items():
        rows = predict_generate([str(path)], [{"text_a": s} for s in SENTENCES], [], 32, None, "test")
        expected[name] = [r["text"] for r in rows]
    assert len({tuple(t) for t in expected.values()}) == len(runs)  # every prompt writes its own texts
    jobs = [(name, k) for k in range(len(SENTENCES)) for name in runs]  # interleaved: each wave mixes prompts

    def ask(job):
        name, k = job
        return srv.json("POST", "/v1/completions", {"model": name, "prompt": SENTENCES[k]})

    before, before_alone = _metric(srv, "ptune_serve_batch_rows_count"), _decode_histogram(srv)
    with ThreadPoolExecutor(9) as pool:
        answers = list(pool.map(ask, jobs))
    assert _metric(srv, "ptune_serve_batch_rows_count") - before < len(jobs)  # decoded together
    decodes, alone = (a - b for a, b in zip(_decode_histogram(srv), before_alone, strict=True))
    assert alone < decodes, "no decode batch mixed prompts"
    for (name, k), (status, body) in zip(jobs, answers, strict=True):
        assert status == 200, body
        assert body["object"] == "text_completion" and body["model"] == name
        (choice,) = body["choices"]
        assert choice["text"] == expected[name][k], (name, k)
        assert choice["finish_reason"] in ("stop", "length")
    status, body = srv.json("POST", "/v1/completions", {"model": "deep", "prompt": SENTENCES[:3]})
    assert status == 200 and [c["text"] for c in body["choices"]] == expected["deep"][:3]
    assert body["usage"]["completion_tokens"] <= 3 * 6


@pytest.mark.parametrize("kind", ["llama", "t5"])
def test_mixed_completion_decode_equals_per_prompt_decode(tiny_models, tmp_path, kind):
    """fp32, at the decode: rows of four prompts (soft slots 3 and 2, prefixes 3 and 6, prompts of different
    lengths) decoded in one batch write, token for token, what each prompt's rows write decoded alone; on a decoder
    (left padding) and an encoder-decoder."""
    runs = gen_prompts(tiny_models, tmp_path, names=[n for n, *_ in GEN_PROMPTS], kind=kind)
    server = PromptServer([str(p) for p in runs.values()])
    examples = [{"text_a": s} for s in SENTENCES]

    def rows(prompt, ks) -> list[GenRow]:
        ids, answers = render_split(prompt.task.renderer, [examples[k] for k in ks])
        return [GenRow(ids=x, max_tokens=8) for x in prompt_rows(ids, answers)]

    ks = list(range(len(SENTENCES)))
    alone = {}
    for p in server.prompts:
        assert p.decodes_mixed
        got = rows(p, ks)
        decode_rows(p.task.model, got, server.device, server.amp)
        alone[p.name] = [r.tokens for r in got]
    assert len({str(t) for t in alone.values()}) == len(runs)  # the prompts write different tokens
    mixed, owners = [], []
    for k in ks:  # row k of prompt (k + j) % n: every prompt beside every other, lengths all different
        for j in range(len(server.prompts)):
            p = server.prompts[(k + j) % len(server.prompts)]
            mixed += rows(p, [k])
            owners.append((p, k))
    assert len({len(r.ids) for r in mixed}) > len(SENTENCES) // 2
    decode_rows([p.task.model for p, _ in owners], mixed, server.device, server.amp)
    for (p, k), r in zip(owners, mixed, strict=True):
        assert r.tokens == alone[p.name][k], (p.name, k)
    assert sum(len(r.tokens) for r in mixed) > len(mixed)  # real text, not stop tokens at once


def _forced_logits(models, rows: list[list[int]], forced: list[list[int]], server) -> torch.Tensor:
    """[rows, steps, vocab] logits of ``decode_rows``'s decoder (same inputs, masks and prefixes) when each row is
    fed the tokens ``forced`` instead of its own choices: comparable under any rounding, unlike greedy tokens."""
    pm = models[0]
    ids, mask = collate_prompts(rows, pm.pad_id, pm.family.left_pad)
    with torch.inference_mode(), autocast(server.device, server.amp):
        vectors, prefixes, keep = _prompt_inputs(models, server.device)
        with da.prefixes(prefixes, keep):
            dec = _Decoder(pm, ids, mask, use_cache=True, bare=False, vectors=vectors)
            out = [dec.start()]
            for t in range(len(forced[0]) - 1):
                out.append(dec.step(torch.tensor([f[t] for f in forced])))
    return torch.stack(out, 1).float()


@pytest.mark.parametrize("kind", ["llama", "t5"])
def test_mixed_decode_step_logits_equal_each_prompt_alone(tiny_models, tmp_path, kind, amp):
    """The mixed decode's invariant on the precision axis: every row's logits at every step, fed the same tokens,
    equal its prompt's rows decoded alone, in fp32 and under bf16 autocast (where greedy tokens may flip on a
    near-tie, so tokens are not compared): per-row soft slots, masked deep-prefix padding, positions and the cache."""
    runs = gen_prompts(tiny_models, tmp_path, names=[n for n, *_ in GEN_PROMPTS], kind=kind)
    server = PromptServer([str(p) for p in runs.values()], precision="fp32" if amp is None else "bf16")
    assert server.amp == amp
    ids = {}
    for p in server.prompts:
        rendered, answers = render_split(p.task.renderer, [{"text_a": s} for s in SENTENCES[:3]])
        ids[p.name] = prompt_rows(rendered, answers)
    forced = [[(7 * k + 3 * t) % 50 + 4 for t in range(4)] for k in range(3)]
    alone = {p.name: _forced_logits([p.task.model] * 3, ids[p.name], forced, server) for p in server.prompts}
    owners = [(p, k) for k in range(3) for p in server.prompts]  # every prompt beside every other
    mixed = _forced_logits([p.task.model for p, _ in owners], [ids[p.name][k] for p, k in owners],
                           [forced[k] for _, k in owners], server)
    for row, (p, k) in enumerate(owners):
        ref = alone[p.name][k]
        scale = float(ref.abs().max())  # bf16: about one rounding step of the largest logit
        torch.testing.assert_close(mixed[row], ref, atol=close(amp, 1e-5) * scale, rtol=close(amp, 1e-5),
                                   msg=lambda m, p=p, k=k: f"{p.name} row {k}: {m}")


def test_completions_of_a_prompt_that_cannot_mix_decode_alone(tiny_models, tmp_path):
    """The batcher decodes the rows of every prompt whose readout mixes in one batch and a prompt whose readout
    does not (``Readout.decodes_mixed`` false) on its own; every text is the one its prompt decodes alone."""
    runs = gen_prompts(tiny_models, tmp_path)
    server = PromptServer([str(p) for p in runs.values()])
    deep, soft, prefix = server.prompts
    prefix.task.model.readout.decodes_mixed = lambda family: False
    examples = [{"text_a": s} for s in SENTENCES[:2]]
    metrics = Metrics()
    batcher = Batcher(server, metrics, max_batch=64, max_wait=2.0, max_queue=64)
    try:
        jobs = [CompleteJob(p, examples, [GenRow(ids=[], max_tokens=6) for _ in examples])
                for p in (deep, prefix, soft)]
        futures = [batcher.submit(j) for j in jobs]
        got = {j.prompt.name: [r.tokens for r in f.result(timeout=60)] for j, f in zip(jobs, futures, strict=True)}
    finally:
        batcher.stop(timeout=10)
    assert metrics.batches == 2 and metrics.decode_prompts.counts[:2] == [1, 2]  # {deep, soft} and {prefix}
    for p in server.prompts:
        ids, answers = render_split(p.task.renderer, examples)
        alone = [GenRow(ids=x, max_tokens=6) for x in prompt_rows(ids, answers)]
        decode_rows(p.task.model, alone, server.device, server.amp)
        assert got[p.name] == [r.tokens for r in alone], p.name


def test_the_batcher_keeps_long_lived_objects_out_of_garbage_collection(bert_runs):
    """``freeze_gc`` (``ptune serve``): what is alive when the worker starts is frozen, and frozen again after every
    change of the prompts, so that what a change brings in is out of the collector's sight too. A full collection of
    a served MiniLM's ~420,000 objects took 213 ms and came every ~300 requests, stalling the batch then running."""
    import gc

    server = PromptServer([str(p) for p in bert_runs.values()])
    before = gc.get_freeze_count()
    plain = Batcher(server, Metrics(), max_batch=8, max_wait=0.0, max_queue=8)
    plain.control(lambda s: None).result(timeout=30)
    plain.stop(timeout=10)
    assert gc.get_freeze_count() == before  # only a batcher told to freezes anything
    held: list = []
    batcher = Batcher(server, Metrics(), max_batch=8, max_wait=0.0, max_queue=8, freeze_gc=True)
    try:
        batcher.control(lambda s: None).result(timeout=30)  # the worker has started
        frozen = gc.get_freeze_count()
        assert frozen > before + 1000  # the backbone's and prompts' modules, parameters, configs
        batcher.control(lambda s: held.extend([] for _ in range(5000))).result(timeout=30)  # a change
        batcher.control(lambda s: None).result(timeout=30)  # runs after the change's freezing
        assert gc.get_freeze_count() >= frozen + 5000
    finally:
        batcher.stop(timeout=10)
        gc.unfreeze()


def _stream(srv, body) -> tuple[list[dict], list[str]]:
    status, headers, raw = srv.request("POST", "/v1/completions", {**body, "stream": True})
    assert status == 200 and headers["content-type"].startswith("text/event-stream"), raw
    lines = [x for x in raw.decode().split("\n") if x]
    assert all(x.startswith("data: ") for x in lines) and lines[-1] == "data: [DONE]"
    chunks = [json.loads(x[6:]) for x in lines[:-1]]
    return chunks, lines


def test_streamed_completion_is_the_same_text(gen_server):
    srv, _ = gen_server
    body = {"model": "deep", "prompt": SENTENCES[1], "max_tokens": 8}
    status, whole = srv.json("POST", "/v1/completions", body)
    chunks, _ = _stream(srv, body)
    assert len(chunks) >= 2  # the text arrives in pieces, then the finish
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["choices"][0]["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])


def test_completion_settings(gen_server):
    srv, _ = gen_server
    prompt = {"model": "soft", "prompt": SENTENCES[0], "max_tokens": 12}
    greedy = srv.json("POST", "/v1/completions", prompt)[1]["choices"][0]["text"]
    # top_p that keeps one token is greedy decoding
    nucleus = srv.json("POST", "/v1/completions", {**prompt, "temperature": 1.0, "top_p": 1e-6, "seed": 1})[1]
    assert nucleus["choices"][0]["text"] == greedy
    # sampling is reproducible with a seed, and another seed writes another text
    a, b, c = (srv.json("POST", "/v1/completions", {**prompt, "temperature": 1.5, "seed": s})[1]["choices"][0]["text"]
               for s in (5, 5, 6))
    assert a == b and a != c and a != greedy
    short = srv.json("POST", "/v1/completions", {**prompt, "max_tokens": 2})[1]
    assert short["usage"]["completion_tokens"] == 2 and short["choices"][0]["finish_reason"] == "length"
    word = greedy.split()[1]
    stopped = srv.json("POST", "/v1/completions", {**prompt, "stop": [word]})[1]["choices"][0]
    assert stopped["text"] == greedy[: greedy.index(word)] and stopped["finish_reason"] == "stop"
    chunks, _ = _stream(srv, {**prompt, "stop": word})
    assert "".join(c["choices"][0]["text"] for c in chunks) == stopped["text"]
    # a stop string across two tokens: the stream holds back what may turn out to be its start
    first, second = greedy.split()[:2]
    across = first[-1] + " " + second[0]
    stopped = srv.json("POST", "/v1/completions", {**prompt, "stop": across})[1]["choices"][0]
    assert stopped["text"] == greedy[: greedy.index(across)]
    chunks, _ = _stream(srv, {**prompt, "stop": across})
    assert "".join(c["choices"][0]["text"] for c in chunks) == stopped["text"]
    for bad, words in (({"max_tokens": 17}, '"max_tokens" must be an integer from 1 to 16'),
                       ({"temperature": -1}, '"temperature" must be a number'),
                       ({"top_p": 0}, '"top_p"'), ({"n": 2}, '"n"'), ({"stop": [1]}, '"stop"'),
                       ({"stream": "yes"}, '"stream"'), ({"echo": True}, "unknown field 'echo'")):
        status, body = srv.json("POST", "/v1/completions", {**prompt, **bad})
        assert status == 400 and words in body["error"]["message"], (bad, body)
    status, body = srv.json("POST", "/v1/classify", {"model": "soft", "inputs": ["x"]})
    assert status == 400 and "use POST /v1/completions" in body["error"]["message"]
    status, body = srv.json("DELETE", "/v1/models/soft", token=None)
    assert status == 403 and "needs a token" in body["error"]["message"]  # a server without a token: no admin


def test_command_line_errors(bert_runs, tmp_path, capsys, monkeypatch):
    """Bad arguments end in one line and exit 2, before any model loads; a port in use is named. The port case runs
    in a real process; the others in this one (``_serve``, which loads and serves, must not be reached)."""
    import socket

    import ptune.commands.serve as serve_command

    from .helpers import ptune_here
    from .test_cli import ptune

    def no_serving(*_):
        raise AssertionError("ptune serve got past its argument checks")

    monkeypatch.setattr(serve_command, "_serve", no_serving)
    run = str(bert_runs["soft4"])
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        cases = [
            ([str(tmp_path / "nothing")], "no checkpoint at"),
            ([str(tmp_path)], "nor in its subfolders"),
            ([run, "--port", "70000"], "--port 70000 is not a port"),
            ([run, "--max-batch", "0"], "--max-batch 0 must be > 0"),
            ([run, f"x={run}", f"x={run}"], "two runs would be served as 'x'"),
            ([run, "--port", port], f"cannot listen on 127.0.0.1:{port}"),
        ]
        for args, words in cases:
            if "--port" in args and args[-1] == port:
                res = ptune("serve", *args, cwd=tmp_path)
            else:
                res = ptune_here("serve", *args, cwd=tmp_path, capsys=capsys, monkeypatch=monkeypatch)
            assert res.returncode == 2 and words in res.stderr, (args, res.stderr)
            assert res.stderr.startswith("ptune: error:") and "Traceback" not in res.stderr


def test_length_chunks_cut_where_padding_costs_more_than_a_forward():
    from ptune.server.batcher import CHUNK_OVERHEAD, length_chunks

    lengths = [40, 12, 41, 11, 13, 39, 10, 42]
    chunks = length_chunks(lengths, 32)
    assert sorted(k for c in chunks for k in c) == list(range(len(lengths)))
    assert [sorted(lengths[k] for k in c) for c in chunks] == [[10, 11, 12, 13], [39, 40, 41, 42]]
    assert length_chunks([20] * 10, 32) == [sorted(range(10), key=lambda k: 20)]  # equal lengths: one forward
    assert all(len(c) <= 3 for c in length_chunks([20] * 10, 3))
    near = [20, 21, 20 + CHUNK_OVERHEAD // 8]  # saving fewer padded tokens than a forward costs: no cut
    assert len(length_chunks(near, 32)) == 1
