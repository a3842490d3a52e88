"""The docs site (mkdocs.yml, docs/) and the README that points into it: the README stays short, every page it or the
nav names exists, the config reference is the one the schema generates and describes every key, the architecture
page names every module, and `mkdocs build --strict` passes without the network."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from dataclasses import dataclass, fields
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"


def _load_script():
    script = REPO / "scripts" / "gen_config_reference.py"
    spec = importlib.util.spec_from_file_location("ptune_gen_config_reference", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def gen():
    return _load_script()


def _nav_pages(nav) -> list[str]:
    out = []
    for item in nav:
        value = next(iter(item.values())) if isinstance(item, dict) else item
        out += _nav_pages(value) if isinstance(value, list) else [value]
    return out


def _mkdocs_config() -> dict:
    return yaml.safe_load((REPO / "mkdocs.yml").read_text(encoding="utf-8"))


def test_readme_is_at_most_200_lines():
    n = len((REPO / "README.md").read_text(encoding="utf-8").splitlines())
    assert n <= 200, f"README.md has {n} lines: move detail into a docs/ page"


def test_every_page_the_readme_links_exists():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    targets = re.findall(r"\]\(([^)\s]+)\)", readme)
    local = [t.split("#", 1)[0] for t in targets if not re.match(r"[a-z]+:|#", t)]
    assert "docs/reference/config.md" in local and "docs/architecture.md" in local
    missing = [t for t in local if not (REPO / t).exists()]
    assert not missing, missing


def test_the_nav_names_every_page_and_only_pages_that_exist():
    pages = _nav_pages(_mkdocs_config()["nav"])
    assert not [p for p in pages if not (DOCS / p).is_file()]
    on_disk = sorted(p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md"))
    assert sorted(pages) == on_disk


def test_the_getting_started_page_has_the_readmes_manual_setup_block():
    """The manual install steps live in the README (the project's first page) and in getting-started: same bytes."""
    block = re.compile(r"By hand, the same steps are:\n\n```bash\n(.*?)```", re.S)
    readme = block.search((REPO / "README.md").read_text(encoding="utf-8"))
    page = block.search((DOCS / "getting-started.md").read_text(encoding="utf-8"))
    assert readme and page and readme.group(1) == page.group(1)


# ------------------------------------------------------------------------------------------- config reference
def test_the_config_reference_is_what_the_schema_generates(gen):
    committed = (DOCS / "reference" / "config.md").read_text(encoding="utf-8")
    assert committed == gen.render(), "docs/reference/config.md is stale: run python scripts/gen_config_reference.py"


def test_every_schema_key_has_a_description_and_a_row(gen):
    assert gen.missing_descriptions() == []
    page = (DOCS / "reference" / "config.md").read_text(encoding="utf-8")
    from ptune.config import SCHEMAS, DataConfig, SearchConfig
    from ptune.tuners import METHODS

    schemas = [(g, s) for g, s in SCHEMAS.items()] + [("data", DataConfig), ("search", SearchConfig)]
    schemas += [("method", t.config_class) for t in METHODS.values()]
    rows = set(re.findall(r"^\| `([\w.]+)` \|", page, re.M))
    absent = [f"{g}.{f.name}" for g, s in schemas for f in fields(s) if f"{g}.{f.name}" not in rows]
    assert not absent, absent
    for _, tuner in METHODS.items():  # one section per method, in the registry
        assert f"\n## method={tuner.config_class.name}\n" in page


@dataclass
class _Probe:
    """A schema as the generator reads it."""

    # the comment lines right above a field
    # describe it
    above: int = 0
    trailing: str = "x"  # the comment on its line
    # | this continues trailing's, not undocumented's
    undocumented: float = 0.5
    continued: str = "y"  # starts here
    # | and goes on


def test_the_generator_reads_descriptions_from_field_comments(gen):
    assert gen.description(_Probe, "above") == "the comment lines right above a field describe it"
    expected = "the comment on its line | this continues trailing's, not undocumented's"
    assert gen.description(_Probe, "trailing") == expected
    assert gen.description(_Probe, "undocumented") == ""
    assert gen.description(_Probe, "continued") == "starts here | and goes on"


@dataclass
class _Bare:
    key: int = 0  # described, but its class says nothing


def test_a_key_or_a_group_without_a_description_fails_the_check(gen, monkeypatch):
    real = gen.groups
    monkeypatch.setattr(gen, "groups", lambda: [*real(), ("probe", "probe", _Probe)])
    assert gen.missing_descriptions() == ["probe.undocumented (_Probe)"]
    assert gen.main(["--check"]) == 1
    monkeypatch.setattr(gen, "groups", lambda: [*real(), ("bare", "bare", _Bare)])
    assert gen.missing_descriptions() == ["bare (_Bare: its docstring)"]  # not dataclass's made-up signature
    assert gen.class_doc(_Probe) == "A schema as the generator reads it."


# ---------------------------------------------------------------------------------------------- architecture
def test_the_architecture_page_names_every_module():
    page = (DOCS / "architecture.md").read_text(encoding="utf-8")
    named = set()
    for path in re.findall(r"`(ptune/[\w/{},.]+\.py)`", page):
        m = re.match(r"(.*)\{(.*)\}(.*)", path)
        named |= {f"{m.group(1)}{part}{m.group(3)}" for part in m.group(2).split(",")} if m else {path}
    modules = {p.relative_to(REPO).as_posix() for p in (REPO / "ptune").rglob("*.py")}
    assert not sorted(modules - named), "add a line for each to docs/architecture.md"
    assert not sorted(named - modules), "docs/architecture.md names modules that do not exist"


# --------------------------------------------------------------------------------------------------- the build
def _mkdocs_required() -> bool:
    """mkdocs-material is in the dev extra, which `make test` and CI install: where the rest of that extra is
    installed, a missing mkdocs is a broken set-up, not a reason to skip."""
    import importlib.metadata as md

    try:
        import tomllib
    except ImportError:  # Python 3.10
        return False
    from packaging.requirements import Requirement

    extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["dev"]
    others = [Requirement(r).name for r in extra if not Requirement(r).name.startswith("mkdocs")]
    try:
        for name in others:
            md.version(name)
    except md.PackageNotFoundError:
        return False
    return True


def test_mkdocs_build_strict_passes_offline(tmp_path):
    if importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("material") is None:
        if _mkdocs_required():
            pytest.fail("mkdocs-material (dev extra) is not installed: pip install -e '.[dev]'")
        pytest.skip("mkdocs-material is not installed (dev extra)")
    dead = "http://127.0.0.1:9"  # any request a plugin makes fails, and --strict turns its warning into a failure
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "HTTP_PROXY": dead, "HTTPS_PROXY": dead, "http_proxy": dead,
           "https_proxy": dead, "NO_PROXY": "", "no_proxy": ""}
    site = tmp_path / "site"
    res = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    for page in _nav_pages(_mkdocs_config()["nav"]):
        assert (site / page.replace(".md", ".html")).is_file(), page
