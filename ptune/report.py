"""`ptune report DIR`: summarise a multirun sweep (or any folder of runs) over seeds.

Runs are found by their ``results.json`` (recursively); the values a run was launched with come from Hydra's
``.hydra/overrides.yaml`` in its folder. Runs are grouped by every swept key except the seed (``trainer.seed``),
plus method/backbone/dataset when those differ between runs; each group reports the selection metric's mean and
sample standard deviation over its runs, the mean best step, trainable parameters, train/eval throughput, and the
number of runs (and of failed jobs: folders holding a ``FAILED`` marker). A ``results.json`` that is truncated,
not JSON, not an object or missing numbers is skipped with one ``ptune: warning:`` line naming it; when no usable
run is left, that is the one-line error. (``metrics.jsonl`` is not read by the report.)

Writes, atomically, beside the runs: ``summary.csv`` (full precision), ``summary.md``, ``summary.png`` (metric
against the swept numeric parameter, one line per remaining combination, e.g. per method/backbone); prints a rich
table. A multirun writes its report automatically at its end (``SweepReport``, a Hydra callback registered in
``conf/config.yaml``).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .atomic import atomic_write_bytes, atomic_write_text
from .config import parse_overrides
from .errors import PtuneError

SEED_KEYS = ("trainer.seed", "seed")
RESULT_KEYS = ("method", "backbone", "dataset")  # grouping keys taken from results.json when they vary
FAILED = "FAILED"


@dataclass
class Run:
    path: Path
    results: dict[str, Any] | None  # None for a failed job
    params: dict[str, Any] = field(default_factory=dict)  # override key -> value
    error: str = ""


@dataclass
class Group:
    key: tuple  # values of the grouping keys
    runs: list[Run]
    failed: list[Run]

    def values(self, name: str) -> list[float]:
        return [float(r.results[name]) for r in self.runs if r.results and r.results.get(name) is not None]

    def metric_values(self) -> list[float]:
        return self.values("best_metric")


# --------------------------------------------------------------------------------------------- collection
def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts[:-1])


def override_values(items: list[str]) -> dict[str, Any]:
    """Hydra override strings -> {key: value}; ``+experiment=x`` gives key ``experiment``."""
    out: dict[str, Any] = {}
    try:
        for o in parse_overrides(items):
            if o.is_delete():
                continue
            out[o.key_or_group] = _hashable(o.value())
        return out
    except PtuneError:  # fall back to a plain split for anything Hydra's grammar rejects
        out = {}
    for item in items:
        key, _, value = item.partition("=")
        out[key.lstrip("+~")] = _parse_scalar(value)
    return out


def _hashable(value: Any) -> Any:
    if isinstance(value, list | dict | tuple):
        return json.dumps(value, sort_keys=True, default=str)
    return value


def _parse_scalar(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def _read_overrides(folder: Path) -> dict[str, Any]:
    path = folder / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return {}
    from omegaconf import OmegaConf

    try:
        items = OmegaConf.to_container(OmegaConf.load(path))
    except Exception:  # noqa: BLE001 - an unreadable bookkeeping file only loses the grouping values
        return {}
    return override_values([str(x) for x in items or []])


NUMERIC_RESULTS = ("best_step", "trainable_params", "train_examples_per_s", "eval_examples_per_s")


def results_problem(results: Any) -> str | None:
    """Why a parsed results.json cannot be summarised (None if it can): the report does arithmetic on these
    values, so a string or a nested object where a number belongs would otherwise crash it mid-way."""
    if not isinstance(results, dict):
        return f"holds a JSON {type(results).__name__}, not an object"
    if "best_metric" not in results:
        return "has no best_metric"

    def number(v: Any) -> bool:
        return isinstance(v, int | float) and not isinstance(v, bool)

    if not number(results["best_metric"]):
        return f"best_metric is {_short(results['best_metric'])}, not a number"
    for key in NUMERIC_RESULTS:
        if results.get(key) is not None and not number(results[key]):
            return f"{key} is {_short(results[key])}, not a number"
    metrics = results.get("metrics")
    if metrics is not None and (
        not isinstance(metrics, dict) or not all(number(metrics.get(k)) for k in ("accuracy", "macro_f1"))
    ):
        return "metrics is not an object with numeric accuracy and macro_f1"
    return None


def _short(value: Any, limit: int = 40) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= limit else text[:limit] + "..."


def collect_runs(root: Path, skipped: list[str] | None = None) -> tuple[list[Run], list[Run]]:
    """(finished runs, failed jobs) under ``root``.

    A results.json that cannot be read or summarised (truncated by a kill, edited by hand, not a ptune file)
    is left out and described in ``skipped`` (one line each), so one bad run does not cost the whole report.
    """
    runs, failed = [], []
    for res in sorted(root.rglob("results.json")):
        if _hidden(res, root):
            continue
        try:
            results = json.loads(res.read_text(encoding="utf-8"))
            problem = results_problem(results)
        except OSError as exc:
            problem = f"cannot be read ({exc.strerror or exc})"
        except UnicodeDecodeError:
            problem = "is not UTF-8 text"
        except json.JSONDecodeError as exc:
            problem = f"is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})"
        except (ValueError, RecursionError):  # an integer of thousands of digits, nesting too deep
            problem = "is not valid JSON (a number too long or nesting too deep)"
        if problem is not None:
            if skipped is not None:
                skipped.append(f"{res} {problem}")
            continue
        runs.append(Run(res.parent, results, _read_overrides(res.parent)))
    for marker in sorted(root.rglob(FAILED)):
        if _hidden(marker, root) or (marker.parent / "results.json").is_file():
            continue
        error = marker.read_text(encoding="utf-8", errors="replace").strip().splitlines()
        failed.append(Run(marker.parent, None, _read_overrides(marker.parent), error[0] if error else ""))
    return runs, failed


# --------------------------------------------------------------------------------------------- grouping
def _sort_key(value: Any) -> tuple:
    if isinstance(value, bool) or value is None:
        return (2, str(value))
    if isinstance(value, int | float):
        return (0, float(value))
    return (1, str(value))


def grouping_keys(runs: list[Run], failed: list[Run]) -> list[str]:
    """Swept keys (values differ between runs), in override order, without the seed; then result keys."""
    everyone = runs + failed
    keys: list[str] = []
    for r in everyone:
        keys.extend(k for k in r.params if k not in keys)
    swept = [k for k in keys if k not in SEED_KEYS and len({repr(r.params.get(k)) for r in everyone}) > 1]
    for k in RESULT_KEYS:
        if k not in swept and len({str(r.results.get(k)) for r in runs if r.results}) > 1:
            swept.append(k)
    return swept


def _value(run: Run, key: str) -> Any:
    if key in run.params:
        return run.params[key]
    if key in RESULT_KEYS and run.results is not None:
        return run.results.get(key)
    return None


def group_runs(runs: list[Run], failed: list[Run], keys: list[str]) -> list[Group]:
    groups: dict[tuple, Group] = {}
    for r in runs:
        k = tuple(_value(r, key) for key in keys)
        groups.setdefault(k, Group(k, [], [])).runs.append(r)
    for r in failed:
        k = tuple(_value(r, key) for key in keys)
        groups.setdefault(k, Group(k, [], [])).failed.append(r)
    return [groups[k] for k in sorted(groups, key=lambda t: tuple(_sort_key(v) for v in t))]


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else math.nan


def _std(xs: list[float]) -> float:
    return statistics.stdev(xs) if len(xs) > 1 else (0.0 if xs else math.nan)


def summarise(root: Path) -> tuple[list[str], list[dict[str, Any]], list[Run]]:
    """(grouping keys, one row per group, failed jobs) for the runs under ``root``."""
    skipped: list[str] = []
    runs, failed = collect_runs(root, skipped)
    if not runs and not failed:
        if skipped:  # the only error line: the bad file is the reason there is nothing to report
            more = f" (and {len(skipped) - 1} more unusable results.json)" if len(skipped) > 1 else ""
            raise PtuneError(f"no usable runs under {str(root)!r}: {skipped[0]}{more}")
        raise PtuneError(f"no runs under {str(root)!r}: expected run folders holding results.json")
    for line in skipped:
        print(f"ptune: warning: skipping a run: {line}", file=sys.stderr)
    keys = grouping_keys(runs, failed)
    rows = []
    for g in group_runs(runs, failed, keys):
        metric_names = sorted({str(r.results.get("metric", "")) for r in g.runs if r.results})
        params = g.values("trainable_params")
        seeds = [_value(r, "trainer.seed") for r in g.runs]
        if all(s is None for s in seeds):
            seeds = [_value(r, "seed") for r in g.runs]
        row: dict[str, Any] = dict(zip(keys, g.key, strict=True))
        row.update(
            {
                "metric": "/".join(metric_names),
                "mean": _mean(g.metric_values()),
                "std": _std(g.metric_values()),
                "accuracy_mean": _mean(
                    [float(r.results["metrics"]["accuracy"]) for r in g.runs if "metrics" in r.results]
                ),
                "macro_f1_mean": _mean(
                    [float(r.results["metrics"]["macro_f1"]) for r in g.runs if "metrics" in r.results]
                ),
                "best_step_mean": _mean(g.values("best_step")),
                "trainable_params": int(params[0]) if params and len(set(params)) == 1 else _mean(params),
                "train_examples_per_s": _mean(g.values("train_examples_per_s")),
                "eval_examples_per_s": _mean(g.values("eval_examples_per_s")),
                "n_runs": len(g.runs),
                "n_failed": len(g.failed),
                "seeds": " ".join(str(s) for s in seeds if s is not None),
                "runs": " ".join(_rel(r.path, root) for r in g.runs),
            }
        )
        rows.append(row)
    return keys, rows, failed


def _rel(path: Path, root: Path) -> str:
    rel = path.relative_to(root).as_posix()
    return rel if rel != "." else "."


# --------------------------------------------------------------------------------------------- output
def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        return f"{v:.{digits}f}"
    return str(v)


DISPLAY = (
    ("mean ± std", lambda r: f"{_fmt(r['mean'])} ± {_fmt(r['std'])}" if r["n_runs"] else "-"),
    ("best step", lambda r: _fmt(r["best_step_mean"], 0)),
    ("trainable", lambda r: f"{r['trainable_params']:,}" if isinstance(r["trainable_params"], int) else "-"),
    ("train ex/s", lambda r: _fmt(r["train_examples_per_s"], 1)),
    ("eval ex/s", lambda r: _fmt(r["eval_examples_per_s"], 1)),
    ("runs", lambda r: str(r["n_runs"]) + (f" ({r['n_failed']} failed)" if r["n_failed"] else "")),
)


def _metric_title(rows: list[dict[str, Any]]) -> str:
    names = sorted({r["metric"] for r in rows if r["metric"]})
    return "/".join(names) or "metric"


def to_csv(keys: list[str], rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else keys, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: _csv_cell(v) for k, v in r.items()})
    return buf.getvalue()


def _csv_cell(v: Any) -> Any:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    return repr(v) if isinstance(v, float) else v


def to_markdown(root: Path, keys: list[str], rows: list[dict[str, Any]], failed: list[Run]) -> str:
    metric = _metric_title(rows)
    n = sum(r["n_runs"] for r in rows)
    head = [*keys, f"{metric} (mean ± std)", *(d[0] for d in DISPLAY[1:])]
    lines = [
        f"# Sweep report: {root}",
        "",
        f"{n} finished run(s), {len(failed)} failed; grouped by "
        f"{', '.join(f'`{k}`' for k in keys) or 'nothing (one group)'}; mean ± sample std over seeds.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join("---" for _ in head) + "|",
    ]
    for r in rows:
        cells = [_fmt(r[k]) for k in keys] + [fn(r) for _, fn in DISPLAY]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    if failed:
        lines += ["", "## Failed jobs", ""]
        lines += [f"- `{_rel(r.path, root)}`: {r.error or 'failed'}" for r in failed]
    return "\n".join(lines) + "\n"


def print_table(root: Path, keys: list[str], rows: list[dict[str, Any]], failed: list[Run]) -> None:
    from .progress import print_table as print_rich_table

    columns = [*keys, (f"{_metric_title(rows)} (mean ± std)", "right"), *((name, "right") for name, _ in DISPLAY[1:])]
    console = print_rich_table(
        f"ptune report: {root}", columns, ([*[_fmt(r[k]) for k in keys], *[fn(r) for _, fn in DISPLAY]] for r in rows)
    )
    for r in failed:
        console.print(f"[red]failed[/red] {_rel(r.path, root)}: {r.error}", highlight=False)


def _numeric(values: list[Any]) -> bool:
    return all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)


def plot(path: Path, keys: list[str], rows: list[dict[str, Any]]) -> None:
    """Metric against the first swept numeric key; one line per combination of the other keys."""
    try:
        import matplotlib
    except ImportError:
        raise PtuneError("summary.png needs matplotlib: pip install matplotlib (or ptune[dev])") from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["n_runs"]]
    x_key = next((k for k in keys if _numeric([r[k] for r in rows]) and len({r[k] for r in rows}) > 1), None)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    if x_key is not None:
        others = [k for k in keys if k != x_key]
        lines: dict[tuple, list[dict[str, Any]]] = {}
        for r in rows:
            lines.setdefault(tuple(r[k] for k in others), []).append(r)
        for combo, rs in lines.items():
            rs = sorted(rs, key=lambda r: r[x_key])
            label = ", ".join(f"{k}={_fmt(v)}" for k, v in zip(others, combo, strict=True)) or None
            ax.errorbar(
                [r[x_key] for r in rs],
                [r["mean"] for r in rs],
                yerr=[r["std"] for r in rs],
                marker="o",
                capsize=3,
                label=label,
            )
        ax.set_xlabel(x_key)
        xs = sorted({r[x_key] for r in rows})
        if xs[0] > 0 and xs[-1] / xs[0] >= 8:  # geometric grids (prompt length 1, 4, 16, 64; learning rates)
            ax.set_xscale("log")
            ax.minorticks_off()
        if len(xs) <= 12:
            ax.set_xticks(xs, [_fmt(x) for x in xs])
        if any(label for label in lines if label):
            ax.legend(fontsize="small")
    else:
        labels = [", ".join(_fmt(r[k]) for k in keys) or "all runs" for r in rows]
        ax.bar(range(len(rows)), [r["mean"] for r in rows], yerr=[r["std"] for r in rows], capsize=3)
        ax.set_xticks(range(len(rows)), labels, rotation=30, ha="right", fontsize="small")
    ax.set_ylabel(f"{_metric_title(rows)} (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=120)
    finally:
        plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


# What a report ptune wrote starts with: an existing summary.* that does not is a user's file, never replaced.
SUMMARY_HEADS = {
    "summary.md": lambda head: head.startswith(b"# Sweep report: "),
    "summary.csv": lambda head: head.split(b"\n", 1)[0].rstrip(b"\r").endswith(b",n_runs,n_failed,seeds,runs"),
    "summary.png": lambda head: head.startswith(b"\x89PNG\r\n\x1a\n") and b"Matplotlib" in head,
}


def refuse_foreign_summary(root: Path) -> None:
    """Refuse (one line, nothing written) to replace a summary.* that ptune did not write: `ptune report` runs on
    any folder of runs, a user's included, so its own earlier report is recognised by its content."""
    for name, ours in SUMMARY_HEADS.items():
        path = root / name
        if not os.path.lexists(path):
            continue
        try:
            with path.open("rb") as fh:
                head = fh.read(4096)
        except OSError:
            head = b""
        if path.is_symlink() or not path.is_file() or not ours(head):
            raise PtuneError(
                f"{str(path)!r} is not a report ptune wrote: ptune report would replace it; move it away "
                "(ptune never replaces files it did not write)"
            )


def write_report(root: str | Path, *, print_it: bool = True) -> dict[str, Any]:
    """Write summary.csv, summary.md and summary.png into ``root``; returns the summary."""
    root = Path(root)
    if not root.is_dir():
        raise PtuneError(f"{str(root)!r} is not a folder")
    keys, rows, failed = summarise(root)
    refuse_foreign_summary(root)
    atomic_write_text(root / "summary.csv", to_csv(keys, rows))
    atomic_write_text(root / "summary.md", to_markdown(root, keys, rows, failed))
    png_error = None
    if any(r["n_runs"] for r in rows):
        try:
            plot(root / "summary.png", keys, rows)
        except PtuneError as exc:
            png_error = str(exc)
    if print_it:
        print_table(root, keys, rows, failed)
        written = "summary.csv, summary.md" + ("" if png_error else ", summary.png")
        print(f"report: {written} in {root}")
        if png_error:
            print(f"report: no summary.png: {png_error}", file=sys.stderr)
    return {"keys": keys, "rows": rows, "failed": [str(r.path) for r in failed], "png_error": png_error}


try:
    from hydra.experimental.callback import Callback as _Callback
except ImportError:  # pragma: no cover - hydra is a dependency
    _Callback = object  # type: ignore[assignment,misc]


def sweep_outcome(root: Path) -> tuple[int, int]:
    """(failed, finished) jobs of a sweep folder: what `ptune train -m` exits on."""
    runs, failed = collect_runs(Path(root), [])
    return len(failed), len(runs)


class SweepReport(_Callback):
    """Hydra callback: write the sweep's report when a multirun ends (failed jobs included)."""

    def on_multirun_end(self, config, **kwargs: Any) -> None:
        try:
            sweep_dir = Path(str(config.hydra.sweep.dir))
            if sweep_dir.is_dir():
                write_report(sweep_dir)
        except Exception as exc:  # noqa: BLE001 - a report problem must not fail a finished sweep
            print(f"ptune: could not write the sweep report: {exc}", file=sys.stderr)
