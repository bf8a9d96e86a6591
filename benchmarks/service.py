"""``gatewayd`` as a real subprocess, for the benchmarks: start it, read its log, find its processes, stop it.

``gatewayd`` is the panel process; it starts one child, the storage/uplink process
(``python -m gateway.uplink.process``), which inherits its stdout and stderr: both processes' JSON log lines
land in the one file given to :func:`start_gatewayd` (the storage process writes ``uplink connected``,
``reading``, ``event stored`` and ``event forwarded``; the panel ``panel started``, ``storage/uplink process
connected`` and its faults).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from common import stop_service

from gateway.panel.children import PROCESS_NAMES, process_name
from tests.support.unit import interpreter_environment

try:
    import psutil
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise SystemExit("this benchmark needs psutil (the bench extra): .venv/bin/pip install -e '.[bench]'") from exc

__all__ = ["DaemonLog", "ServiceSampler", "gatewayd_command", "process", "role_of", "service_processes",
           "start_gatewayd", "stop_gatewayd", "wall"]

STORAGE_MODULE = "gateway.uplink.process"


class DaemonLog:
    """Reads gatewayd's JSON log lines (its own and its storage child's) as they are written."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0
        self.entries: list[dict[str, Any]] = []

    def poll(self) -> list[dict[str, Any]]:
        with self.path.open("rb") as f:
            f.seek(self._offset)
            data = f.read()
        end = data.rfind(b"\n") + 1
        self._offset += end
        new = []
        for line in data[:end].splitlines():
            if line.startswith(b"{"):
                try:
                    new.append(json.loads(line))
                except ValueError:
                    continue
        self.entries.extend(new)
        return new

    def wait(self, predicate: Callable[[dict[str, Any]], bool], timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        for entry in self.entries:
            if predicate(entry):
                return entry
        while time.monotonic() < deadline:
            for entry in self.poll():
                if predicate(entry):
                    return entry
            time.sleep(0.01)
        raise TimeoutError(f"gatewayd did not log what was expected (see {self.path})")

    def forget(self) -> None:
        """Drop the lines kept so far (a long run reads on without keeping them all)."""
        self.entries.clear()


def wall(entry: dict[str, Any]) -> float:
    """The log line's timestamp as a POSIX time."""
    return datetime.fromisoformat(entry["timestamp"]).timestamp()


def gatewayd_command() -> list[str]:
    """The installed ``gatewayd`` beside this interpreter, else ``python -m gateway.daemon``."""
    gatewayd = Path(sys.executable).with_name("gatewayd")
    return [str(gatewayd)] if gatewayd.exists() else [sys.executable, "-m", "gateway.daemon"]


def compile_like_install() -> None:
    """Write the ``-OO`` bytecode of the installed packages and of the gateway's own code, as ``install.sh``
    does for a building (``compileall -o 2``).

    pip writes only plain bytecode, and a machine with ``PYTHONDONTWRITEBYTECODE`` set never writes the
    ``-OO`` kind either: each process would then compile every module from source at every start, and the
    heap that leaves behind (0.9 MB more PSS for ``typing_extensions`` alone once start-up's heap is handed
    back, measured 2026-12-07) is not what a building's install carries."""
    import drivers
    import gateway

    paths = {sysconfig.get_path("purelib"), sysconfig.get_path("platlib"),
             str(Path(gateway.__file__).parent), str(Path(drivers.__file__).parent)}
    # Not checked: a package may carry a file this Python cannot compile (a test of another version); the
    # benchmark measures on, and prints its JSON, with what did compile.
    subprocess.run([sys.executable, "-m", "compileall", "-q", "-o", "2", *sorted(paths)], check=False,
                   stdout=subprocess.DEVNULL)


def start_gatewayd(config: Path, log_path: Path, *, cmd: list[str] | None = None,
                   extra_env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """``gatewayd --config config`` with the systemd unit's interpreter settings (``python -OO``, malloc arenas)
    and the bytecode they load compiled as a building's install has it (:func:`compile_like_install`), mock
    pins, stdout and stderr (and so its child's) to ``log_path``."""
    compile_like_install()
    env = {**os.environ, **interpreter_environment(), "GPIOZERO_PIN_FACTORY": "mock", "PYTHONUNBUFFERED": "1",
           **(extra_env or {})}
    with log_path.open("ab") as out:
        return subprocess.Popen([*(cmd or gatewayd_command()), "--config", str(config)], stdout=out,
                                stderr=subprocess.STDOUT, env=env, cwd=config.parent)


def process(pid: int) -> psutil.Process:
    """The psutil handle of ``pid`` (so that scripts need not import psutil themselves)."""
    return psutil.Process(pid)


def role_of(p: psutil.Process, panel_pid: int) -> str:
    """``panel`` (gatewayd itself), ``spawner``, ``storage`` (its storage/uplink child), ``sms`` (its SMS child),
    else ``child``: by the name a forked child gives itself (gateway/panel/children.py), else by the command line
    of a child started as a new interpreter."""
    if p.pid == panel_pid:
        return "panel"
    try:
        cmdline = p.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return "child"
    named = {PROCESS_NAMES[STORAGE_MODULE]: "storage", PROCESS_NAMES["gateway.sms.process"]: "sms"}
    if process_name(p.pid) in named:
        return named[process_name(p.pid)]
    if STORAGE_MODULE in cmdline:
        return "storage"
    return "sms" if "gateway.sms.process" in cmdline else "child"


def service_processes(panel: psutil.Process) -> list[psutil.Process]:
    """gatewayd and every process under it."""
    try:
        return [panel, *panel.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _rss_anon_kib(pid: int) -> int:
    """Resident anonymous memory (``RssAnon``): the heap and its like, whatever other processes map."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class ServiceSampler:
    """Memory and CPU of each process of the service; CPU counted per pid since it was first seen."""

    def __init__(self, panel: psutil.Process) -> None:
        self.panel = panel
        self._cpu0: dict[int, float] = {}
        self._t0: dict[int, float] = {}
        self._last: dict[int, tuple[float, float]] = {}  # pid → (time, cpu seconds) at the previous sample
        self.seen: dict[int, str] = {}  # every pid sampled → role

    def sample(self) -> list[dict[str, Any]]:
        """One row per live process: pid, role, rss/pss/uss/anon in MB, threads, cpu_pct since the previous sample
        and cpu_s since first seen."""
        rows = []
        now = time.monotonic()
        for p in service_processes(self.panel):
            try:
                with p.oneshot():
                    full, cpu, threads = p.memory_full_info(), p.cpu_times(), p.num_threads()
                    if p.status() == psutil.STATUS_ZOMBIE:
                        continue
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            used = cpu.user + cpu.system
            role = self.seen.setdefault(p.pid, role_of(p, self.panel.pid))
            if p.pid not in self._cpu0:
                self._cpu0[p.pid], self._t0[p.pid] = used, now
            last_t, last_cpu = self._last.get(p.pid, (self._t0[p.pid], self._cpu0[p.pid]))
            self._last[p.pid] = (now, used)
            rows.append({"pid": p.pid, "role": role, "rss_mb": full.rss / 2**20,
                         "pss_mb": getattr(full, "pss", 0) / 2**20, "uss_mb": full.uss / 2**20,
                         "anon_mb": _rss_anon_kib(p.pid) / 2**10,
                         "threads": threads,
                         "cpu_pct": 100 * (used - last_cpu) / (now - last_t) if now > last_t else 0.0,
                         "cpu_s": used - self._cpu0[p.pid]})
        return rows

    def reset_cpu(self) -> None:
        """Count CPU from now on."""
        self._cpu0.clear()
        self._t0.clear()
        self._last.clear()


def stop_gatewayd(proc: subprocess.Popen[bytes], panel: psutil.Process) -> list[int]:
    """SIGTERM gatewayd (it stops its storage child over the link); kill any child left running: their pids."""
    try:
        children = panel.children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    stop_service(proc)
    killed = []
    for child in children:
        try:
            child.wait(5)
        except psutil.TimeoutExpired:
            if child.status() != psutil.STATUS_ZOMBIE:
                print(f"gatewayd left pid {child.pid} running; killing it", file=sys.stderr)
                killed.append(child.pid)
                child.kill()
                child.wait(5)
        except psutil.NoSuchProcess:
            pass
    return killed
