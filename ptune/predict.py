"""`ptune predict`: class predictions of one or more prompt checkpoints, written as JSONL.

Every input is scored by every checkpoint given (or only by the one its ``"checkpoint"`` key names). All
checkpoints share one backbone and the rows of different prompts are mixed in the same batches
(``ptune.serving``). One output line per (input, checkpoint)::

    {"index": 0, "checkpoint": "runs/a", "label": 1, "label_name": "positive",
     "probs": {"negative": 0.12, "positive": 0.88}}

``probs`` is the softmax of the class scores (verbalizer scores or head logits). Output is strict JSON: when a
checkpoint yields a non-finite score, that line has ``"label": null``, null probabilities and an ``"error"``.
"""

from __future__ import annotations

import json
import math
import os
import stat
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .errors import PtuneError


def _file_kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISFIFO, "a named pipe"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Input objects, one per non-blank line. Only regular files are opened: a named pipe would block forever
    and a device such as /dev/zero never ends, so each gets a true one-line refusal instead."""
    p = Path(path)
    where = f"input file {str(path)!r}"
    try:
        mode = p.stat().st_mode
    except FileNotFoundError:
        raise PtuneError(f"{where} does not exist") from None
    except OSError as exc:
        raise PtuneError(f"{where} cannot be read: {exc.strerror or exc}") from None
    if stat.S_ISDIR(mode):
        raise PtuneError(f"{where} is a folder: give a JSONL file with one JSON object per line")
    if not stat.S_ISREG(mode):
        if os.path.realpath(p) == os.devnull:
            raise PtuneError(f"{where} is empty (the null device): give a JSONL file with one JSON object per line")
        raise PtuneError(f"{where} is {_file_kind(mode)}, not a regular file: save the input to a file first")
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise PtuneError(f"{where} cannot be read: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise PtuneError(
            f"{path}:{line}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}): "
            "ptune predict reads UTF-8 JSONL"
        ) from None
    rows = []
    for n, line in enumerate(text.split("\n"), 1):  # '\n' only: JSON strings may hold U+2028 and the like
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PtuneError(f"{path}:{n}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        except RecursionError:
            raise PtuneError(f"{path}:{n}: JSON nested too deeply to read") from None
        except ValueError:  # an integer longer than Python's 4300-digit conversion limit
            raise PtuneError(f"{path}:{n}: holds a number too long to read (over 4300 digits)") from None
        if not isinstance(obj, dict):
            raise PtuneError(f'{path}:{n}: each line must be a JSON object such as {{"text_a": "..."}}')
        rows.append(obj)
    if not rows:
        raise PtuneError(f"{where} is empty: it holds no JSON lines")
    return rows



def example_for(prompt, obj: Mapping[str, Any], where: str) -> dict[str, str]:
    """The example ``prompt``'s template renders from one input object (``prompt.columns``: where each field is)."""
    out = {}
    for name, columns in prompt.columns.items():
        for col in columns:
            if col in obj and obj[col] is not None:
                out[name] = str(obj[col])
                break
        else:
            raise PtuneError(
                f"{where}: no field {name!r} for checkpoint {prompt.name!r} (its template "
                f"{prompt.task.renderer.template.source!r} reads {', '.join(prompt.fields)}; "
                f"the input has {', '.join(sorted(obj)) or 'no keys'})"
            )
    return out


def _route(obj: Mapping[str, Any], prompts: list, where: str) -> list[int]:
    """Prompt indices an input goes to: all, or the one named by its "checkpoint" key (path or index)."""
    if "checkpoint" not in obj:
        return list(range(len(prompts)))
    want = obj["checkpoint"]
    if isinstance(want, int) and not isinstance(want, bool) and 0 <= want < len(prompts):
        return [want]
    if isinstance(want, str):
        target = Path(want).resolve()
        for i, p in enumerate(prompts):
            ckpt = Path(p.checkpoint).resolve()
            if want == p.name or target in (ckpt, ckpt.parent, Path(p.name).resolve()):
                return [i]
    names = ", ".join(p.name for p in prompts)
    raise PtuneError(f'{where}: "checkpoint": {want!r} is none of the checkpoints given ({names})')


def class_row(labels: Sequence[str], scores: torch.Tensor) -> dict[str, Any]:
    """label, label_name and probs (softmax of the class scores, 6 decimals) of one prediction; ``ptune serve``
    answers with the same row."""
    probs = torch.softmax(scores.float(), -1).tolist()
    if not all(math.isfinite(p) for p in probs):
        # a NaN/Inf score has no argmax worth reporting, and NaN is not JSON: say "no prediction" with nulls
        return {"label": None, "label_name": None, "probs": dict.fromkeys(labels), "error": "non-finite class scores"}
    k = int(torch.argmax(scores))
    rounded = {name: round(p, 6) for name, p in zip(labels, probs, strict=True)}
    return {"label": k, "label_name": labels[k], "probs": rounded}


def predict(
    paths: Sequence[str],
    inputs: Sequence[Mapping[str, Any]],
    overrides: Sequence[str] = (),
    batch_size: int = 32,
    device: str | None = None,
    server=None,
    source: str = "input",
) -> list[dict[str, Any]]:
    from .serving import PromptServer

    server = server or PromptServer(paths, overrides, device=device)
    names = [p.name for p in server.prompts]
    requests, owners = [], []
    for n, obj in enumerate(inputs):
        where = f"{source} line {n + 1}"
        for i in _route(obj, server.prompts, where):
            requests.append((i, example_for(server.prompts[i], obj, where)))
            owners.append(n)
    scores = server.scores(requests, batch_size=batch_size)
    rows = []
    for (i, _), n, s in zip(requests, owners, scores, strict=True):
        rows.append({"index": n, "checkpoint": names[i], **class_row(server.prompts[i].label_names, s)})
    return rows


def is_predictions_file(path: Path) -> bool:
    """Whether ``path`` holds what ptune predict writes (every line an object with "index" and "checkpoint"): the
    only existing file --output may replace."""
    try:
        if path.is_symlink() or not path.is_file() or path.stat().st_size > 1 << 30:
            return False
        lines = [x for x in path.read_text(encoding="utf-8").split("\n") if x.strip()]
        rows = [json.loads(x) for x in lines]
    except (OSError, ValueError, RecursionError):
        return False
    return bool(rows) and all(isinstance(r, dict) and {"index", "checkpoint"} <= r.keys() for r in rows)


def check_output_path(output: str, input: str | None = None) -> Path:
    """Refuse an output path that cannot be written, or that would replace the input or any file ptune predict did
    not write, before any model is loaded or any input scored."""
    path = Path(output)
    parent = path.parent
    if path.is_dir():
        example = str(path / "predictions.jsonl")
        raise PtuneError(f"--output {output!r} is a folder: give a file path such as {example!r}")
    if input is not None and os.path.lexists(path) and os.path.realpath(path) == os.path.realpath(input):
        raise PtuneError(f"--output {output!r} is the --input file: give another file for the predictions")
    if os.path.lexists(path) and not is_predictions_file(path):
        raise PtuneError(
            f"--output {output!r} exists and is not a predictions file of ptune's: give a new file name "
            "(ptune replaces only its own earlier predictions)"
        )
    if not parent.exists():
        raise PtuneError(f"--output {output!r}: folder {str(parent)!r} does not exist")
    if not parent.is_dir():
        raise PtuneError(f"--output {output!r}: {str(parent)!r} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PtuneError(f"--output {output!r}: folder {str(parent)!r} is not writable")
    return path


def predict_generate(paths, inputs, overrides, batch_size: int, device: str | None, source: str) -> list[dict]:
    """``ptune predict --generate``: the text each checkpoint (template.readout=generate) writes for each input,
    one row per (input, checkpoint): ``{"index", "checkpoint", "text"}``."""
    from types import SimpleNamespace

    from .batching import Encoded
    from .config import trainer_config
    from .data import input_columns
    from .generation import generate_texts, prompt_rows
    from .inference import load_task
    from .runtime import pick_amp, pick_device
    from .token_cache import render_split

    prompts = []
    for p in paths:
        task, cfg, ckpt, _ = load_task(p, list(overrides))
        task.model.readout.check_prediction(True, p)
        fields = task.renderer.template.field_names
        prompts.append(SimpleNamespace(name=p, checkpoint=str(ckpt), task=task, cfg=cfg, fields=fields,
                                       columns=input_columns(cfg.dataset, fields)))
    requests: list[list[tuple[int, dict]]] = [[] for _ in prompts]
    for n, obj in enumerate(inputs):
        where = f"{source} line {n + 1}"
        for i in _route(obj, prompts, where):
            requests[i].append((n, example_for(prompts[i], obj, where)))
    rows = []
    for prompt, reqs in zip(prompts, requests, strict=True):
        if not reqs:
            continue
        tr = trainer_config(prompt.cfg)
        dev = pick_device(device or tr.device)
        amp = pick_amp(tr.precision, dev)
        prompt.task.model.to(dev)
        ids, answers = render_split(prompt.task.renderer, [ex for _, ex in reqs])
        data = Encoded(prompt_rows(ids, answers), answers, [0] * len(ids))
        texts = generate_texts(prompt.task.model, data, batch_size, dev, amp)
        rows += [{"index": n, "checkpoint": prompt.name, "text": t} for (n, _), t in zip(reqs, texts, strict=True)]
    return sorted(rows, key=lambda r: r["index"])
