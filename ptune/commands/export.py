"""`ptune export PATH --format peft --output DIR`: a checkpoint as a PEFT adapter, checked by reloading it."""

from __future__ import annotations

import argparse

from ..errors import PtuneError
from ..export import export_peft


def export_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="ptune export", description="Export a prompt checkpoint for other libraries.")
    parser.add_argument("paths", nargs="+", help="a run folder or checkpoint/ folder, then key=value overrides")
    parser.add_argument("--format", choices=("peft",), default="peft")
    parser.add_argument("--output", required=True, help="folder to write")
    parser.add_argument("--no-verify", action="store_true", help="skip reloading the export with PEFT to compare")
    args = parser.parse_args(argv)
    paths = [p for p in args.paths if "=" not in p]
    overrides = [p for p in args.paths if "=" in p]
    if len(paths) != 1:
        raise PtuneError("ptune export takes exactly one checkpoint path")
    info = export_peft(paths[0], args.output, overrides, check=not args.no_verify)
    what = f"PEFT {info['peft_type']} adapter ({info['num_virtual_tokens']} virtual tokens)"
    if "file" in info["readout"]:
        what += f"; the [CLS] head is not part of a PEFT adapter and was written to {info['readout']['file']}"
    checked = info.get("verified_max_abs_diff")
    print(
        f"exported {what} to {args.output}"
        + ("" if checked is None else f"; PEFT reload matches ptune (max diff {checked:.2e})")
    )
    if info["drop_leading_token_ids"]:
        print(
            f"note: feed PEFT inputs without the leading token ids {info['drop_leading_token_ids']} "
            "(see ptune_export.json)"
        )
