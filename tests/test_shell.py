"""gatewayctl's shell completion and man page, generated from its parser (gateway/ops/shell.py): bash completes
the real commands and options, zsh gets a completion function, the man page names every command."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys

import pytest

from gateway.ops.cli import build_parser
from gateway.ops.shell import completion, manpage

COMMANDS = ["status", "events", "silence", "reset", "test", "buzzer-test", "relay-test", "read", "scan", "sms",
            "config", "doctor"]


def _generated(what: str) -> str:
    result = subprocess.run([sys.executable, "-m", "gateway.ops.shell", *what.split()], capture_output=True,
                            text=True, timeout=60, check=True)
    return result.stdout


def _require_tool(name: str, package: str) -> None:
    """Skip without the program ``name``; under CI (CI=true) its absence is a failure: scripts/test installs it."""
    if shutil.which(name) is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"{name} is required under CI (scripts/test installs it): apt-get install {package}")
        pytest.skip(f"{name} is required: apt-get install {package}")


def bash_complete(script: str, *words: str) -> list[str]:
    """What bash offers for the last of ``words`` (the word being typed), with the generated script loaded."""
    quoted = " ".join(f"'{w}'" for w in ("gatewayctl", *words))
    program = (f"{script}\nCOMP_WORDS=({quoted}); COMP_CWORD={len(words)}; COMP_LINE=\"${{COMP_WORDS[*]}}\"; "
               "COMP_POINT=${#COMP_LINE}; _shtab_gatewayctl gatewayctl; printf '%s\\n' \"${COMPREPLY[@]}\"")
    result = subprocess.run(["bash", "--norc", "-c", program], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return sorted(set(result.stdout.split()))


def test_the_parser_knows_every_command() -> None:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert sorted(sub.choices) == sorted(COMMANDS)  # this file's list is the parser's


def test_bash_completes_commands_options_and_choices() -> None:
    script = _generated("completion bash")
    assert script == completion("bash")
    assert bash_complete(script, "") == sorted(COMMANDS)
    assert bash_complete(script, "sta") == ["status"]
    assert {"--watch", "--unit", "--problems", "--all"} <= set(bash_complete(script, "status", "--"))
    assert bash_complete(script, "events", "--format", "") == ["csv", "jsonl", "text"]
    assert bash_complete(script, "config", "") == ["check", "show"]


def test_zsh_gets_a_completion_function_for_every_command() -> None:
    script = _generated("completion zsh")
    assert script.startswith("#compdef gatewayctl")
    assert all(f"        {command}) " in script for command in COMMANDS), script[-3000:]
    assert "--problems" in script and "_files" in script  # --config FILE completes file names
    _require_tool("zsh", "zsh")  # a syntax check by zsh itself
    subprocess.run(["zsh", "-n", "-c", script], check=True, timeout=60)


def test_the_man_page_names_every_command_and_option() -> None:
    page = _generated("man")
    assert page == manpage() and page.startswith(".TH GATEWAYCTL \"1\"")
    assert "gatewayctl \\- technician's command line of the gateway" in page
    roff = [command.replace("-", "\\-") for command in COMMANDS]  # roff escapes a hyphen
    assert all(f".SS \\fBgatewayctl {command}\\fR" in page for command in roff)
    assert "\\-\\-problems" in page and "\\-\\-format" in page
    _require_tool("man", "man-db")  # and it renders
    shown = subprocess.run(["man", "-l", "-"], input=page, capture_output=True, text=True, timeout=60,
                           env={"MANWIDTH": "100", "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"})
    assert shown.returncode == 0 and "gatewayctl scan" in shown.stdout, shown.stderr
