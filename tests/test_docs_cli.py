"""docs/cli.md stays true: every ``$ gatewayctl ...`` example in it runs, in order, against a real demo
(``python -m gateway_sim.demo``, the example building with its leak on), and must give the documented exit code and
the documented columns: table headers, CSV header, the labels that start its lines and the keys of its JSON.
The examples of "When the daemon is not running" run after the demo is stopped. Values (times, pids, ports)
are not compared: they differ at every run."""

from __future__ import annotations

import json
import os
import re
import select
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support.wait import kill_demo, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "cli.md"
GATEWAYCTL = str(Path(sys.executable).with_name("gatewayctl"))
DOWN_SECTION = "## When the daemon is not running"
#: Examples that cannot run here, and why: each is named, so none is left out unseen.
NOT_RUN = {
    "gatewayctl config show | grep -E '^(mqtt|control)'": "a shell pipe",
    "gatewayctl status     # as a user outside group gateway": "needs another user",
    "gatewayctl silence    # as a member of group gateway, not of gateway-operators": "needs another user",
    "gatewayctl scan bus1 --from 5 --to 5 --pause-polling": "needs a multi-channel controller on the bus "
    "(tests/test_read_plans.py scans one)",
}
_HEADER_TOKEN = re.compile(r"^[A-Z][A-Z/]*$")


@dataclass
class Example:
    command: str
    output: list[str]
    exit_code: int | None
    daemon_down: bool


def examples() -> list[Example]:
    """Every ``$ gatewayctl`` example of docs/cli.md, with its documented output and exit code."""
    text = DOC.read_text(encoding="utf-8")
    down_at = text.index(DOWN_SECTION)
    found: list[Example] = []
    for block in re.finditer(r"```\n(.*?)```", text, flags=re.S):
        current: Example | None = None
        for line in block.group(1).splitlines():
            if line.startswith("$ "):
                current = Example(line[2:], [], None, block.start() > down_at)
                found.append(current)
            elif current is not None and (exit_line := re.fullmatch(r"\[exit (\d+)\]", line)):
                current.exit_code = int(exit_line.group(1))
            elif current is not None and line:
                current.output.append(line)
    return found


def header_lines(lines: list[str]) -> list[tuple[str, ...]]:
    """Column headers: lines of three or more upper-case words (``TIME KIND ACTION ...``)."""
    out = []
    for line in lines:
        tokens = tuple(line.split())
        if len(tokens) >= 3 and all(_HEADER_TOKEN.match(t) for t in tokens):
            out.append(tokens)
    return out


def labels(lines: list[str]) -> set[str]:
    """The first word of each line that is neither a header, a value (a time, a number) nor an elision."""
    headers = set(header_lines(lines))
    return {line.split()[0] for line in lines
            if line.strip() and tuple(line.split()) not in headers and not line.strip()[0].isdigit()
            and not line.strip().startswith(("[", "{", "}", "]", "\""))}


def keys_within(documented: Any, actual: Any, path: str = "") -> list[str]:
    """Keys of the documented JSON that the actual JSON lacks (lists: against the keys of all its items)."""
    missing: list[str] = []
    if isinstance(documented, dict):
        if not isinstance(actual, dict):
            return [path or "<root>"]
        for key, value in documented.items():
            if key not in actual:
                missing.append(f"{path}.{key}")
            else:
                missing += keys_within(value, actual[key], f"{path}.{key}")
    elif isinstance(documented, list) and documented and isinstance(documented[0], dict):
        merged: dict[str, Any] = {}
        for item in actual if isinstance(actual, list) else []:
            merged.update(item)
        missing += keys_within(documented[0], merged, f"{path}[]")
    return missing


def compare(example: Example, output: str, code: int) -> None:
    lines = output.splitlines()
    where = f"{example.command!r}:\n{output[-3000:]}"
    if example.exit_code is not None:
        assert code == example.exit_code, where
    for header in header_lines(example.output):
        assert header in header_lines(lines), (header, where)
    csv_header = [line for line in example.output if line.startswith("time,")]
    assert csv_header == [line for line in lines if line.startswith("time,")][: len(csv_header)], where
    if example.output and example.output[0] == "{":
        documented = json.loads("\n".join(example.output))
        actual = json.loads(output.splitlines()[0])
        assert keys_within(documented, actual) == [], where
    elif example.output and example.output[0].startswith("{"):
        assert keys_within(json.loads(example.output[0]), json.loads(lines[0])) == [], where
    else:
        assert labels(example.output) <= labels(lines), (labels(example.output) - labels(lines), where)


def run(example: Example, config: Path, cwd: Path) -> tuple[str, int]:
    argv = shlex.split(example.command)
    argv = [GATEWAYCTL, "--config", config.name, *argv[1:]]  # as a technician in its directory would
    env = {**os.environ, "NO_COLOR": "1"}
    if "--follow" not in argv and "-f" not in argv:
        result = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=120, env=env)
        return result.stdout + result.stderr, result.returncode
    # a follower runs until Ctrl-C: read what it prints first, then interrupt it as a terminal would
    proc = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    assert proc.stdout is not None
    seen = b""
    deadline = time.monotonic() + 30
    while seen.count(b"\n") < len(example.output) and time.monotonic() < deadline:
        if select.select([proc.stdout], [], [], 0.5)[0]:
            seen += os.read(proc.stdout.fileno(), 65536)
    os.killpg(proc.pid, signal.SIGINT)
    proc.wait(timeout=30)
    return seen.decode(errors="replace") + proc.stdout.read().decode(errors="replace"), 0 if proc.returncode == 0 else 1


def test_the_examples_are_the_commands_there_are() -> None:
    found = examples()
    assert len(found) >= 25
    assert {e.command for e in found} >= set(NOT_RUN)
    commands = {shlex.split(e.command.split("|")[0].split("#")[0])[1] for e in found}
    assert commands >= {"status", "events", "silence", "reset", "test", "buzzer-test", "relay-test", "read", "scan",
                        "config", "doctor"}


def test_every_example_in_docs_cli_md_against_a_demo(tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "GPIOZERO_PIN_FACTORY")}
    demo = subprocess.Popen([sys.executable, "-m", "gateway_sim.demo", "--duration", "600", "--dir", str(workdir)],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    config = workdir / "building.toml"
    try:
        def leaking() -> bool:
            if not (workdir / "control.sock").exists():
                return False
            result = subprocess.run([GATEWAYCTL, "--config", str(config), "status", "--json"], capture_output=True,
                                    text=True, timeout=30)
            if result.returncode != 0:
                return False
            devices = {d["device"]: d for d in json.loads(result.stdout)["data"]["devices"]}
            leak = devices.get("gas-u1-201", {})
            return leak.get("state") == "high_alarm" and leak.get("value") == 35.0

        wait_until(leaking, timeout=90, interval=0.5, message="the demo's leak never reached 35 %LEL")
        ran = 0
        for example in examples():
            if example.command in NOT_RUN:
                continue
            if example.daemon_down and demo.poll() is None:
                os.killpg(demo.pid, signal.SIGINT)  # Ctrl-C: a planned stop, the latch saved
                assert demo.wait(timeout=60) == 0
            output, code = run(example, config, workdir)
            compare(example, output, code)
            ran += 1
        assert ran == len(examples()) - len(NOT_RUN)
    finally:
        if demo.poll() is None:
            kill_demo(demo)
