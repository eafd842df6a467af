"""The documentation: the site builds with warnings as errors, the tutorial's code runs, and
the pages that list the errors and the command line's options agree with the code.

The tutorial (docs/tutorial.md) is executed as written, in a temporary directory:
- a ```python title="NAME"``` block is written to the file NAME;
- a ```python``` block runs, in order, in one namespace shared by all of them;
- a ```bash``` block runs each of its lines as a command (they all start with `ssmc`);
- a ```text``` block right after a ```bash``` block is an excerpt of what its last command
  prints: each line of it other than `...` must be a line of that output.
"""
from __future__ import annotations

import argparse
import builtins
import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

import ssmc
from ssmc import cli, dsl
from ssmc.lowerings import legal_lowerings

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
FENCE = re.compile(r"^```(\w+)([^\n]*)\n(.*?)^```\s*$", re.S | re.M)
TITLE = re.compile(r'title="([^"]+)"')


def code_blocks(path: Path) -> list[tuple[str, str | None, str]]:
    """(language, title or None, body) of each fenced block of a markdown page, in order."""
    blocks = []
    for lang, info, body in FENCE.findall(path.read_text()):
        title = TITLE.search(info)
        blocks.append((lang, title.group(1) if title else None, body))
    return blocks


def ssmc_command() -> list[str]:
    """The `ssmc` entry point of the running interpreter's environment."""
    script = Path(sys.executable).parent / "ssmc"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from ssmc.cli import main; sys.exit(main())"]


def run_command(line: str, cwd: Path, env: dict) -> str:
    words = shlex.split(line)
    assert words[0] == "ssmc", f"the tutorial's commands are ssmc commands, got {line!r}"
    result = subprocess.run(ssmc_command() + words[1:], cwd=cwd, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, (f"{line!r} exited with {result.returncode}:\n"
                                    f"{result.stdout}\n{result.stderr}")
    return result.stdout


def test_tutorial_runs(tmp_path, monkeypatch):
    blocks = code_blocks(DOCS / "tutorial.md")
    assert [lang for lang, _, _ in blocks].count("python") >= 5
    # the tutorial's files and exports land in tmp_path; its kernels and tuning results in a
    # cache of their own, so the test neither reads nor changes the user's cache
    env = {**os.environ, "SSMC_CACHE_DIR": str(tmp_path / "cache")}
    monkeypatch.setenv("SSMC_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    namespace: dict = {"__name__": "__tutorial__"}
    last_output = None
    for i, (lang, title, body) in enumerate(blocks):
        where = f"tutorial block {i} ({lang})"
        if lang == "python" and title:
            (tmp_path / title).write_text(body)
        elif lang == "python":
            exec(compile(body, where, "exec"), namespace)  # noqa: S102 - the tutorial's code
        elif lang == "bash":
            for line in body.strip().splitlines():
                last_output = run_command(line, tmp_path, env)
        elif lang == "text":
            assert last_output is not None, f"{where}: an output excerpt with no command before it"
            printed = {line.rstrip() for line in last_output.splitlines()}
            for line in body.splitlines():
                if line.strip() not in ("", "..."):
                    assert line.rstrip() in printed, (f"{where}: {line!r} is not in the "
                                                      f"output:\n{last_output}")
            last_output = None
        else:
            pytest.fail(f"{where}: the test does not know how to run a {lang!r} block")
    assert (tmp_path / "gated_cpu" / "manifest.json").is_file()
    sys.modules.pop("my_ssm", None)  # the tutorial's module, imported from tmp_path


# -- the errors page -------------------------------------------------------------------------

def table_rows(text: str, first_header: str) -> list[list[str]]:
    """The rows of the markdown table whose first header cell is `first_header`."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == first_header:
            rows = []
            for row in lines[i + 2:]:
                if not row.startswith("|"):
                    break
                rows.append([c.strip() for c in row.strip().strip("|").split("|")])
            return rows
    raise AssertionError(f"no table with a first column {first_header!r}")


def test_errors_page_lists_every_error_with_its_builtin_base():
    rows = table_rows((DOCS / "errors.md").read_text(), "class")
    documented = {}
    for row in rows:
        name, base = row[0].strip("`"), row[1].strip("`").split()[0].strip("`")
        cls = getattr(ssmc, name)
        builtin = getattr(builtins, base, None)
        assert isinstance(builtin, type) and issubclass(builtin, BaseException), row
        assert issubclass(cls, ssmc.SSMCError) and issubclass(cls, builtin), row
        documented[name] = cls
    public = {name for name in ssmc.__all__ if isinstance(getattr(ssmc, name), type)
              and issubclass(getattr(ssmc, name), ssmc.SSMCError)}
    assert set(documented) == public - {"SSMCError"}


# -- the command-line page -------------------------------------------------------------------

def parser_options(parser: argparse.ArgumentParser) -> set[str]:
    return {opt for action in parser._actions for opt in action.option_strings
            if opt not in ("-h", "--help")}


def test_cli_page_documents_every_option():
    text = (DOCS / "cli.md").read_text()
    parser = cli.build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    sections = re.split(r"^## ", text, flags=re.M)
    for name, sub in subparsers.choices.items():
        section = next((s for s in sections if s.startswith(f"`ssmc {name}`")), None)
        assert section is not None, f"docs/cli.md has no section `ssmc {name}`"
        first_cells = {c for row in table_rows(section, "option") for c in
                       re.findall(r"`(-{1,2}[a-z][a-z-]*)", row[0])}
        assert first_cells == parser_options(sub), name
    assert set(subparsers.choices) == set(cli.SUBCOMMANDS)


# -- the language page -----------------------------------------------------------------------

def with_decay(axes: str | None):
    """A definition whose decay is sigmoid of an input with these axes (None: no decay)."""
    if axes is None:
        def fn(q, k, v):
            return dsl.recurrence(key=k, value=v, query=q)
    else:
        def fn(q, k, v, w):
            return dsl.recurrence(decay=dsl.sigmoid(w), key=k, value=v, query=q)
    # annotation objects, not strings: this module's own annotations are postponed
    fn.__annotations__ = {"q": dsl.In["b t h n"], "k": dsl.In["b t h n"], "v": dsl.In["b t h p"]}
    if axes is not None:
        fn.__annotations__["w"] = dsl.In[axes]
    return ssmc.ssm(fn, name=f"decay_{(axes or 'none').replace(' ', '')}")


#: a decay of each structure, by the decay_kind the language page gives it
DECAY_EXAMPLES = {"none": None, "time_invariant": "h", "scalar": "b t h",
                  "diagonal": "b t h n", "full": "b t h n p"}


def test_language_page_decay_table_matches_the_classification():
    rows = table_rows((DOCS / "language.md").read_text(), "decay axes")
    assert {row[1].strip("`") for row in rows} == set(DECAY_EXAMPLES)
    for row in rows:
        kind = row[1].strip("`")
        program = with_decay(DECAY_EXAMPLES[kind]).program
        assert program.decay_kind.value == kind, row
        documented = tuple(x.strip() for x in row[2].split(","))
        assert legal_lowerings(program) == documented, row


# -- the language's API page -----------------------------------------------------------------

def test_dsl_page_names_every_function_of_the_language():
    text = (DOCS / "api" / "dsl.md").read_text()
    for name in dsl.__all__:
        assert f"{name}" in text, f"docs/api/dsl.md does not mention S.{name}"


# -- the site --------------------------------------------------------------------------------

def test_docs_build_strict(tmp_path):
    if importlib.util.find_spec("mkdocs") is None:
        pytest.skip("mkdocs is not installed (scripts/setup.sh installs it with the [dev] extra)")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet",
         "--config-file", str(ROOT / "mkdocs.yml"), "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout}\n{result.stderr}"
    assert (tmp_path / "site" / "tutorial" / "index.html").is_file()
    assert (tmp_path / "site" / "api" / "ssmc" / "index.html").is_file()
