"""The counters and histograms of GET /metrics, written as Prometheus text by hand (no client library needed)."""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Callable, Sequence

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
PROMPT_BUCKETS = (1, 2, 3, 4, 8, 16, 32)


class Histogram:
    """Cumulative buckets, sum and count, as Prometheus histograms are exposed."""

    def __init__(self, buckets: Sequence[float]):
        self.buckets = tuple(buckets)
        self.counts = [0] * len(self.buckets)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str, labels: str = "") -> list[str]:
        sep = "," if labels else ""
        out = [f'{name}_bucket{{{labels}{sep}le="{b:g}"}} {c}' for b, c in zip(self.buckets, self.counts, strict=True)]
        out.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.count}')
        braces = f"{{{labels}}}" if labels else ""
        out += [f"{name}_sum{braces} {self.sum:.6f}", f"{name}_count{braces} {self.count}"]
        return out


class Metrics:
    """Thread-safe: the HTTP side records requests, the batch worker records batches."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = defaultdict(int)
        self.latency: dict[str, Histogram] = {}
        self.batch_rows = Histogram(BATCH_BUCKETS)
        self.decode_prompts = Histogram(PROMPT_BUCKETS)
        self.batch_seconds = Histogram(LATENCY_BUCKETS)
        self.batches = 0
        self.rows = 0

    def request(self, endpoint: str, code: int, seconds: float) -> None:
        with self._lock:
            self.requests[(endpoint, code)] += 1
            self.latency.setdefault(endpoint, Histogram(LATENCY_BUCKETS)).observe(seconds)

    def batch(self, rows: int) -> None:
        with self._lock:
            self.batch_rows.observe(rows)
            self.batches += 1
            self.rows += rows

    def batch_time(self, seconds: float) -> None:
        """The model worker spent ``seconds`` on one gathered batch (rendering, forwards, answers): its sum over
        the wall time is how busy the model is, so a server that is slow while it is idle waits on HTTP."""
        with self._lock:
            self.batch_seconds.observe(seconds)

    def decode(self, prompts: int) -> None:
        """One decode batch of completion rows ran, holding rows of ``prompts`` different prompts."""
        with self._lock:
            self.decode_prompts.observe(prompts)

    def mean_batch(self) -> float:
        with self._lock:
            return self.rows / self.batches if self.batches else 0.0

    def text(self, gauges: dict[str, tuple[str, Callable[[], float]]]) -> str:
        """The exposition text; ``gauges`` maps a metric name to (help, current value)."""
        with self._lock:
            out = ["# HELP ptune_serve_requests_total HTTP requests answered, by endpoint and status code.",
                   "# TYPE ptune_serve_requests_total counter"]
            out += [f'ptune_serve_requests_total{{endpoint="{e}",code="{c}"}} {n}'
                    for (e, c), n in sorted(self.requests.items())]
            out += ["# HELP ptune_serve_errors_total Requests answered with a 4xx or 5xx status, by code.",
                    "# TYPE ptune_serve_errors_total counter"]
            errors: dict[int, int] = defaultdict(int)
            for (_, c), n in self.requests.items():
                if c >= 400:
                    errors[c] += n
            out += [f'ptune_serve_errors_total{{code="{c}"}} {n}' for c, n in sorted(errors.items())]
            out += ["# HELP ptune_serve_request_seconds Time from request to response headers, by endpoint.",
                    "# TYPE ptune_serve_request_seconds histogram"]
            for e, h in sorted(self.latency.items()):
                out += h.lines("ptune_serve_request_seconds", f'endpoint="{e}"')
            out += ["# HELP ptune_serve_batch_rows Rows (inputs) per batch run by the model worker.",
                    "# TYPE ptune_serve_batch_rows histogram"]
            out += self.batch_rows.lines("ptune_serve_batch_rows")
            out += ["# HELP ptune_serve_batch_seconds Time the model worker spent per gathered batch.",
                    "# TYPE ptune_serve_batch_seconds histogram"]
            out += self.batch_seconds.lines("ptune_serve_batch_seconds")
            out += ["# HELP ptune_serve_decode_prompts Different prompts per decode batch of completion rows.",
                    "# TYPE ptune_serve_decode_prompts histogram"]
            out += self.decode_prompts.lines("ptune_serve_decode_prompts")
        for name, (help_, value) in gauges.items():
            out += [f"# HELP {name} {help_}", f"# TYPE {name} gauge", f"{name} {value():g}"]
        return "\n".join(out) + "\n"
