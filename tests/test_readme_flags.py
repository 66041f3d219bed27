"""The README's command summary lists every flag each command takes (issue 15 item 11), read from
the argparse parsers themselves, and ib-bench's JSON file flag is --json-out (--json FILE still
works, with a deprecation note)."""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _parsers():
    from ib_edge.bench.cli import build_parser as bench
    from ib_edge.export.cli import build_parser as export
    from ib_edge.runtime.cli import build_parser as run
    from ib_edge.serve.cli import build_parser as serve
    from ib_edge.triton.cli import build_parser as triton

    return {"ib-export": export(), "ib-run": run(), "ib-bench": bench(), "ib-serve": serve(), "ib-triton": triton()}


def _flags(ap: argparse.ArgumentParser) -> set[str]:
    out = set()
    for action in ap._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                out |= _flags(sub)
        out.update(o for o in action.option_strings if o.startswith("--") and o != "--help")
    return out


def summary_by_command() -> dict[str, str]:
    """The code block under README's "## Commands": command name -> its lines (a line starting
    with the command, and the indented lines continuing it)."""
    text = README.read_text(encoding="utf-8")
    start = text.index("## Commands")
    block = text[text.index("```", start):]
    block = block[block.index("\n") + 1:block.index("```", 3)]
    out: dict[str, str] = {}
    current = None
    for line in block.splitlines():
        if line.startswith("ib-"):
            current = line.split()[0]
        if current is not None:
            out[current] = out.get(current, "") + line + "\n"
    return out


def test_readme_command_summary_lists_every_flag():
    summary = summary_by_command()
    missing = {}
    for name, ap in _parsers().items():
        assert name in summary, f"README's command summary has no line for {name}"
        absent = sorted(f for f in _flags(ap) if not re.search(rf"{re.escape(f)}(?![\w-])", summary[name]))
        if absent:
            missing[name] = absent
    assert not missing, f"flags in --help that README's command summary does not list: {missing}"


def test_bench_json_out_and_the_old_spelling(tmp_path, capsys):
    """--json-out FILE and the deprecated --json FILE reach the same check (a directory is refused
    before anything is measured); giving both is refused."""
    from ib_edge.bench import cli

    assert cli.main(["--json-out", str(tmp_path)]) == 2
    assert "--json-out" in capsys.readouterr().err
    assert cli.main(["--json", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "deprecated, use --json-out" in err and "is a directory" in err
    assert cli.main(["--json", "a.json", "--json-out", "b.json"]) == 2
    assert "give one of them" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--json-out", "--json"])
def test_bench_plan_writes_json_with_either_spelling(flag, tmp_path, capsys):
    from ib_edge.bench import cli

    out = tmp_path / "plan.json"
    assert cli.main(["--plan", "instructblip-vicuna-7b", flag, str(out)]) == 0
    assert json.loads(out.read_text())
