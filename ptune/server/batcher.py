"""The dynamic batcher: one thread owns the model (the main thread under ``ptune serve``); concurrent requests
become mixed batches.

Requests wait in one FIFO. The worker takes the first, then keeps taking more until the batch holds ``max_batch``
rows or ``max_wait`` seconds have passed since it took the first (under load the queue is already full and the wait
is never spent). Classification rows of any mix of prompts run through ``PromptServer.score_encoded``: in one
packed forward where the family packs rows (``ptune.packing``), else in forwards of similar lengths
(``length_chunks``). Completion rows of any mix of prompts
decode together in one batch with the cache (``decode.decode_rows``: per-row soft vectors and deep prefixes), except
those of prompts whose readout cannot mix (``Readout.decodes_mixed``), which decode one prompt at a time. Changes to
the set of prompts (POST/DELETE /v1/models) travel in the same FIFO and are applied by the worker between two
batches: every request accepted before a change is answered as if it had not happened, and no batch ever sees a
half-changed model.

Garbage collection: with ``freeze_gc`` (``ptune serve``), the objects alive when serving starts (the backbone, the
prompts, torch and transformers: ~420,000 objects for MiniLM with 8 prompts) are moved out of the collector's sight
(``gc.freeze``), again after every change of the prompts. A full collection of them took 213 ms, and one came every
~300 requests under load, stalling whichever batch was running and raising p99 latency from ~150 to ~350 ms.

Admission is bounded: at most ``max_queue`` requests accepted and not yet answered (waiting or in the running batch);
``submit`` raises ``QueueFull`` beyond that (HTTP 503).
"""

from __future__ import annotations

import gc
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from ..batching import Encoded
from ..errors import PtuneError, one_line
from ..generation import prompt_rows
from ..predict import class_row
from ..serving import PromptServer, ServedPrompt
from ..token_cache import render_split
from .decode import GenRow, decode_rows
from .metrics import Metrics


class QueueFull(Exception):
    """More requests accepted and unanswered than --max-queue allows."""


class PromptGone(Exception):
    """The prompt a request named was removed before its batch ran (the request came after the DELETE)."""


@dataclass
class ClassifyJob:
    prompt: ServedPrompt
    examples: list[dict[str, str]]
    future: Future = field(default_factory=Future)

    @property
    def size(self) -> int:
        return len(self.examples)


@dataclass
class CompleteJob:
    prompt: ServedPrompt
    examples: list[dict[str, str]]
    rows: list[GenRow]  # ids filled by the worker (rendering happens there)
    future: Future = field(default_factory=Future)

    @property
    def size(self) -> int:
        return len(self.rows)


@dataclass
class Control:
    action: Callable[[PromptServer], Any]
    future: Future = field(default_factory=Future)


_STOP = object()
IDLE_TICK = 0.2  # seconds: how late an idle worker in the main thread runs a signal handler at most


class Batcher:
    """The worker loop is ``run``: on a thread of its own (``thread=True``), or in the caller's thread, which
    ``ptune serve`` does with the main thread (see ``commands/serve.py`` for why)."""

    def __init__(self, server: PromptServer, metrics: Metrics, max_batch: int, max_wait: float, max_queue: int,
                 thread: bool = True, freeze_gc: bool = False):
        """``freeze_gc``: keep the long-lived objects out of garbage collection (see the module's docstring); for a
        process that exists to serve, since it affects the whole process."""
        self.server, self.metrics = server, metrics
        self.freeze_gc = freeze_gc
        self.max_batch, self.max_wait, self.max_queue = max_batch, max_wait, max_queue
        self._fifo: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._pending = 0
        self._thread = None
        if thread:
            self._thread = threading.Thread(target=self.run, name="ptune-serve-worker", daemon=True)
            self._thread.start()

    # ------------------------------------------------------------------ the HTTP side
    @property
    def pending(self) -> int:
        """Requests accepted and not yet answered."""
        return self._pending

    @property
    def waiting(self) -> int:
        """Requests (and model changes) in the FIFO, not yet taken into a batch."""
        return self._fifo.qsize()

    def submit(self, job: ClassifyJob | CompleteJob) -> Future:
        with self._lock:
            if self._pending >= self.max_queue:
                raise QueueFull
            self._pending += 1
        job.future.add_done_callback(self._done)
        self._fifo.put(job)
        return job.future

    def _done(self, _: Future) -> None:
        with self._lock:
            self._pending -= 1

    def control(self, action: Callable[[PromptServer], Any]) -> Future:
        """Run ``action(server)`` on the worker between two batches."""
        c = Control(action)
        self._fifo.put(c)
        return c.future

    def stop(self, timeout: float | None = None) -> None:
        """Answer what is queued, then end ``run`` (joined when it has its own thread)."""
        self._fifo.put(_STOP)
        if self._thread is not None:
            self._thread.join(timeout)

    # ------------------------------------------------------------------ the worker
    def run(self) -> None:
        """Take batches from the FIFO and execute them until ``stop``."""
        self._freeze()
        carry = None
        while True:
            first = carry if carry is not None else self._take()
            carry = None
            if first is _STOP:
                return
            if isinstance(first, Control):
                _settle(first.future, lambda c=first: self._change(c.action))
                continue
            batch, rows = [first], first.size
            deadline = time.monotonic() + self.max_wait
            while rows < self.max_batch:
                try:
                    item = self._fifo.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if item is _STOP or isinstance(item, Control):
                    carry = item  # run what came before it first
                    break
                batch.append(item)
                rows += item.size
            start = time.perf_counter()
            self._execute(batch)
            self.metrics.batch_time(time.perf_counter() - start)

    def _take(self) -> Any:
        """The next item of the FIFO, waited for in slices of ``IDLE_TICK``. Python runs a signal handler only when
        the main thread runs Python: a SIGTERM that the kernel handed to another thread (torch's, uvicorn's) left an
        idle ``ptune serve`` blocked here, its drain handler never run, until a request came (2 of 8 idle stops
        hung)."""
        while True:
            try:
                return self._fifo.get(timeout=IDLE_TICK)
            except queue.Empty:
                continue

    def _change(self, action: Callable[[PromptServer], Any]) -> Any:
        """Apply a change of the prompts; with ``freeze_gc``, a removed prompt's objects are collected and an added
        one's frozen before the change is reported done."""
        result = action(self.server)
        self._freeze()
        return result

    def _freeze(self) -> None:
        if self.freeze_gc:
            gc.unfreeze()
            gc.collect()
            gc.freeze()

    def _execute(self, batch: list) -> None:
        try:
            self._classify([j for j in batch if isinstance(j, ClassifyJob)])
            self._complete([j for j in batch if isinstance(j, CompleteJob)])
        except Exception as exc:  # a bug or a backend failure: answer every job, keep the worker alive
            for j in batch:
                if not j.future.done():
                    j.future.set_exception(RuntimeError(f"{type(exc).__name__}: {one_line(exc, 300)}"))

    def _index(self, job) -> int | None:
        for i, p in enumerate(self.server.prompts):
            if p is job.prompt:
                return i
        job.future.set_exception(PromptGone(job.prompt.name))
        return None

    def _classify(self, jobs: list[ClassifyJob]) -> None:
        server, ready, parts = self.server, [], []
        for j in jobs:
            i = self._index(j)
            if i is None:
                continue
            try:
                parts.append(server.encode([(i, ex) for ex in j.examples]))
            except PtuneError as exc:  # this request's text cannot be rendered: only it fails
                j.future.set_exception(exc)
                continue
            ready.append(j)
        if not ready:
            return
        data = Encoded([r for p in parts for r in p.input_ids], [a for p in parts for a in p.answer_pos],
                       [x for p in parts for x in p.labels])
        self.metrics.batch(len(data))
        scores: list = [None] * len(data)
        if server.packs_rows:  # one packed forward computes about the real tokens only (ptune/packing.py)
            chunks = [list(range(len(data)))]
        else:
            chunks = length_chunks([len(r) for r in data.input_ids], self.max_batch)
        for idx in chunks:
            part = Encoded([data.input_ids[k] for k in idx], [data.answer_pos[k] for k in idx],
                           [data.labels[k] for k in idx])
            for k, s in zip(idx, server.score_encoded(part, batch_size=len(idx)), strict=True):
                scores[k] = s
        at = 0
        for j in ready:
            labels = j.prompt.label_names
            j.future.set_result([class_row(labels, s) for s in scores[at: at + j.size]])
            at += j.size

    def _complete(self, jobs: list[CompleteJob]) -> None:
        """Render every job, then decode: the rows of all prompts that decode mixed in one batch, the others' rows
        one prompt at a time."""
        ready = []
        for j in jobs:
            if self._index(j) is None:
                continue
            try:
                ids, answers = render_split(j.prompt.task.renderer, j.examples)
            except PtuneError as exc:
                j.future.set_exception(exc)
                continue
            for r, x in zip(j.rows, prompt_rows(ids, answers), strict=True):
                r.ids = x
            ready.append(j)
        groups: list[list[CompleteJob]] = [[j for j in ready if j.prompt.decodes_mixed]]
        alone: dict[int, list[CompleteJob]] = {}
        for j in ready:
            if not j.prompt.decodes_mixed:
                alone.setdefault(id(j.prompt), []).append(j)
        for group in [g for g in groups if g] + list(alone.values()):
            rows = [r for j in group for r in j.rows]
            models = [j.prompt.task.model for j in group for _ in j.rows]
            self.metrics.batch(len(rows))
            self.metrics.decode(len({id(j.prompt) for j in group}))
            decode_rows(models, rows, self.server.device, self.server.amp)
            for j in group:
                j.future.set_result(j.rows)


CHUNK_OVERHEAD = 64  # what one more forward costs, in padded tokens (Python and kernel launches; measured on CPU)


def length_chunks(lengths: list[int], max_rows: int) -> list[list[int]]:
    """Rows split into forwards of similar lengths, for families that cannot pack rows: arrivals are not sorted like
    ``ptune predict``'s whole input, and a batch padded to its longest row spends half its work on padding. Sorted by
    length, cut where the padded tokens saved outweigh the cost of one more forward (dynamic programming over the cut
    points, at most ``max_rows`` each)."""
    order = sorted(range(len(lengths)), key=lambda k: lengths[k])
    sizes = [lengths[k] for k in order]
    n = len(sizes)
    best, cut = [0.0] + [float("inf")] * n, [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(max(0, j - max_rows), j):
            cost = best[i] + CHUNK_OVERHEAD + sizes[j - 1] * (j - i)
            if cost < best[j]:
                best[j], cut[j] = cost, i
    chunks, j = [], n
    while j > 0:
        chunks.append(order[cut[j]: j])
        j = cut[j]
    return chunks[::-1]


def _settle(future: Future, fn: Callable[[], Any]) -> None:
    try:
        future.set_result(fn())
    except Exception as exc:  # PtuneError (refused) or anything else: the caller answers it
        future.set_exception(exc)
