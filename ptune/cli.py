"""The `ptune` console script: parses the subcommand and dispatches to its module in ptune/commands/ (imported
only when it runs, so `ptune --help` stays light); shell completion (-sc). User errors end in one line and exit
code 2."""

from __future__ import annotations

import argparse
import os
import sys

from .commands import EXIT_USER_ERROR, fail, quiet
from .errors import PtuneError


def complete_main(argv: list[str]) -> None:
    """`ptune -sc query=bash`: what the completion function installed by `eval "$(ptune train -sc install=bash)"`
    runs on every <TAB>, with the typed line in COMP_LINE. The first word completes to the subcommands; after
    `train`, Hydra completes overrides (groups, keys, values; schemas left out) of a line that it expects to start
    with the program name alone, so the subcommand is taken out of the line first. Other subcommands complete file
    names (the shell's default)."""
    import contextlib
    import io
    import re

    line = os.environ.get("COMP_LINE", "")
    from .commands.train import train_main

    if check_completion_args(argv[1:]) != "query":  # install/uninstall: Hydra prints the script for `ptune`
        train_main(argv)
        return
    words = line.split()
    if len(words) < 2 or (len(words) == 2 and not line[-1:].isspace()):
        typed = words[1] if len(words) == 2 else ""
        print(" ".join(name for name in COMMANDS if name.startswith(typed)))
        return
    if words[1] != "train":
        return
    os.environ["COMP_LINE"] = re.sub(r"^(\s*\S+)\s+train(?=\s|$)", r"\1", line, count=1)
    with contextlib.redirect_stdout(io.StringIO()) as hydra_says:
        train_main(argv)
    # the schemas live in the config groups (each group file starts from one) but are not choices of their own
    print(" ".join(w for w in hydra_says.getvalue().split() if not w.endswith("_schema")))


COMPLETION_SHELLS = ("bash", "zsh", "fish")  # Hydra's completion plugins
COMPLETION_ACTIONS = ("install", "uninstall", "query")


def check_completion_args(args: list[str]) -> str:
    """The action of ``-sc ACTION=SHELL`` (install, uninstall or query), checked before Hydra sees it: Hydra
    raises a ValueError (a traceback) for none or several, an unknown shell, or a query without COMP_LINE, which
    only the installed completion function sets."""
    actions = [(k, v) for k, eq, v in map(lambda a: a.partition("="), args) if eq and k in COMPLETION_ACTIONS]
    other = [a for a in args if a.partition("=")[0] not in COMPLETION_ACTIONS or "=" not in a]
    usage = f"use one of install=SHELL, uninstall=SHELL, query=SHELL with SHELL one of {', '.join(COMPLETION_SHELLS)}"
    if len(actions) != 1 or other:
        shown = repr(" ".join(args)) if args else "no action"
        raise PtuneError(f"shell completion (-sc) got {shown}: {usage}, e.g. eval \"$(ptune train -sc install=bash)\"")
    action, shell = actions[0]
    if shell not in COMPLETION_SHELLS:
        raise PtuneError(f"-sc {action}={shell!r}: no completion for that shell: {usage}")
    if action == "query" and not os.environ.get("COMP_LINE", "").strip():
        raise PtuneError("-sc query=... completes the line in COMP_LINE, which is not set: the shell function that "
                         "`eval \"$(ptune train -sc install=bash)\"` installs runs it on <TAB>")
    return action


def _lazy(module: str, function: str):
    """A subcommand whose module (and its heavy imports) loads only when it runs."""

    def run(argv: list[str]) -> None:
        import importlib

        getattr(importlib.import_module(f"ptune.commands.{module}"), function)(argv)

    return run


COMMANDS = {
    "train": (_lazy("train", "train_main"), "train a prompt; Hydra overrides follow (`-m` for a multirun sweep)"),
    "eval": (_lazy("eval", "eval_main"), "evaluate checkpoints: PATH... [key=value overrides]"),
    "show-template": (
        _lazy("show", "show_template_main"),
        "print the exact tokens fed to the model: [--n N] [Hydra overrides]",
    ),
    "report": (
        _lazy("report", "report_main"),
        "summarise a sweep over seeds: DIR (table, summary.csv/.md/.png)",
    ),
    "search": (
        _lazy("search", "search_main"),
        "Bayesian hyperparameter search (Optuna TPE): +hparams_search=NAME [search.*] [overrides] | --resume DIR",
    ),
    "predict": (
        _lazy("predict", "predict_main"),
        "predict with one or more checkpoints (mixed batches): PATH... --input F.jsonl | --text T [--output O]",
    ),
    "serve": (
        _lazy("serve", "serve_main"),
        "serve checkpoints of one backbone over HTTP (batched): RUN [NAME=RUN ...] [--host H] [--port P]",
    ),
    "export": (
        _lazy("export", "export_main"),
        "export a checkpoint for other libraries: PATH --format peft --output DIR",
    ),
}


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="ptune",
        description="Prompt tuning of frozen transformers: soft prompts, P-tuning v1/v2, prefix tuning.",
        epilog="\n".join(f"  {name:<14} {help_}" for name, (_, help_) in COMMANDS.items())
        + "\n\n`ptune train --help` shows the Hydra config groups.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("command", choices=list(COMMANDS), help="subcommand (see below)")
    if argv[:1] in (["--version"], ["-V"]):
        from .version import __version__

        print(f"ptune {__version__}")
        raise SystemExit(0)
    if argv[:1] in (["-sc"], ["--shell-completion"]):
        try:
            complete_main(argv)
        except PtuneError as exc:
            fail(str(exc))
        return
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        raise SystemExit(0 if argv else EXIT_USER_ERROR)
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        fail(f"unknown command {command!r}: use one of {', '.join(COMMANDS)}")
    quiet()
    try:
        flags = ("-sc", "--shell-completion")
        if command == "train" and any(a in flags for a in rest):  # Hydra reads every other word as its action
            check_completion_args([a for a in rest if a not in flags])
        COMMANDS[command][0](rest)
    except PtuneError as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        fail("interrupted")
