"""The panel's first children forked from the panel itself at start-up, for memory.

A new interpreter for the storage/uplink and the SMS process loads, again in each, what the panel has already
loaded (the interpreter's own state, asyncio, structlog, msgspec, the link, the config machinery). A process
forked from the panel shares those pages with it until one of them writes to them: ``benchmarks/polling.py
--modem`` has the figures (docs/performance.md, "Memory").

The panel cannot fork once it runs: its threads may hold locks a child would inherit held, and it holds the
serial ports and the GPIO lines. So ``gatewayd`` forks the first storage and SMS processes first thing
(:func:`fork_child`), while it is one thread with nothing open but its standard streams and the children's link
sockets, and before it loads the panel's own modules. Every later start (after a child ended or was killed) is
a new interpreter, ``python -m MODULE``, started by the supervisor as before.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from gateway.config import SiteConfig
from gateway.heap import release_startup_heap
from gateway.sms.settings import SmsSettings

__all__ = ["PROCESS_NAMES", "ChildSpec", "FirstChild", "ForkedProcess", "can_fork", "fork_child", "panel_children",
           "process_name"]

#: ``/proc/self/comm`` of each forked child (what ``ps``, ``top`` and the journal show), by module: its command
#: line is the panel's.
PROCESS_NAMES = {"gateway.uplink.process": "gateway-storage", "gateway.sms.process": "gateway-sms"}
_WAIT_STEP_S = 0.05


def process_name(pid: int) -> str:
    """``/proc/<pid>/comm``: the name a forked child gives itself (:data:`PROCESS_NAMES`); "" when unreadable."""
    try:
        with open(f"/proc/{pid}/comm", encoding="utf-8") as f:
            return f.read().strip()
    except OSError:
        return ""


def can_fork() -> bool:
    """Whether this process may fork a child now: one thread only."""
    return threading.active_count() == 1


class ForkedProcess:
    """A child forked by :func:`fork_child`, waited for as a :class:`subprocess.Popen` is."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._lock = threading.Lock()

    def poll(self) -> int | None:
        with self._lock:
            if self.returncode is None:
                try:
                    pid, status = os.waitpid(self.pid, os.WNOHANG)
                except ChildProcessError:  # reaped elsewhere: gone, its status unknown
                    self.returncode = -signal.SIGKILL
                else:
                    if pid:
                        self.returncode = os.waitstatus_to_exitcode(status)
            return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while (code := self.poll()) is None:
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(f"pid {self.pid}", timeout or 0.0)
            time.sleep(_WAIT_STEP_S)
        return code

    def kill(self) -> None:
        if self.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)


def fork_child(module: str, argv: Sequence[str], *, link_fd: int, log_fd: int | None, go_fd: int,
               env: Mapping[str, str]) -> ForkedProcess:
    """Fork ``module.main(argv + ["--link-fd", link_fd])`` as ``python -m module`` would run it, stdout on
    ``log_fd`` (else this process's), every other descriptor closed. The child waits until a byte can be read
    from ``go_fd`` and ends without running anything when it reads none (its writer closed: the panel could not
    start). Call only when :func:`can_fork`."""
    if not can_fork():
        raise RuntimeError("fork_child with threads running")
    # Start-up's garbage collected and its heap handed back first, then everything left frozen: a collection would
    # otherwise write to every object it walks, and each page written stops being shared.
    release_startup_heap()
    gc.freeze()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        return ForkedProcess(pid)
    code = 1
    try:
        code = _run_child(module, argv, link_fd=link_fd, log_fd=log_fd, go_fd=go_fd, env=env)
    except BaseException:
        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _run_child(module: str, argv: Sequence[str], *, link_fd: int, log_fd: int | None, go_fd: int,
               env: Mapping[str, str]) -> int:
    """In the forked child: its descriptors and environment as ``python -m module`` would have them, then, once
    let go, ``module.main``; the exit status."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if log_fd is not None:
        os.dup2(log_fd, 1)
    keep = sorted({0, 1, 2, link_fd, go_fd})
    for low, high in zip(keep, [*keep[1:], os.sysconf("SC_OPEN_MAX")], strict=True):
        os.closerange(low + 1, high)
    if not os.read(go_fd, 1):
        return 0  # the panel ended before it started this child
    os.close(go_fd)
    environment = dict(env)  # a copy first: ``env`` may be os.environ itself
    os.environ.clear()
    os.environ.update(environment)
    with contextlib.suppress(OSError), open("/proc/self/comm", "w") as f:
        f.write(PROCESS_NAMES.get(module, module.rsplit(".", 1)[-1])[:15])
    sys.argv = [module, *argv, "--link-fd", str(link_fd)]
    try:
        return int(importlib.import_module(module).main(sys.argv[1:]) or 0)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)


@dataclass(frozen=True)
class ChildSpec:
    """One of the panel's children: its module (run as ``python -m``), environment and log file (None: the
    panel's own, the journal)."""

    name: str
    module: str
    env: Mapping[str, str] | None
    log_path: str | None

    @property
    def command(self) -> list[str]:
        return [sys.executable, "-m", self.module]

    def fork_first(self, config_path: str) -> FirstChild:
        """The first child, forked now (:func:`fork_child`) with a new link socket pair; it runs once its
        supervisor starts it (:meth:`FirstChild.go`)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        go_read, go_write = os.pipe()
        out = open(self.log_path, "ab") if self.log_path else None  # noqa: SIM115 - closed below
        try:
            proc = fork_child(self.module, ["--config", config_path], link_fd=theirs.fileno(),
                              log_fd=None if out is None else out.fileno(), go_fd=go_read,
                              env=os.environ if self.env is None else self.env)
        except BaseException:
            ours.close()
            os.close(go_write)
            raise
        finally:
            theirs.close()
            os.close(go_read)
            if out is not None:
                out.close()
        return FirstChild(proc, ours, go_write)


@dataclass(frozen=True)
class FirstChild:
    """A child forked at start-up, the panel's end of its link, and the pipe it waits on before it runs; for its
    supervisor's first run."""

    proc: ForkedProcess
    sock: socket.socket
    go_fd: int

    def go(self) -> None:
        """Let the child run (it waits until then; if this process ends first, it ends without running)."""
        try:
            os.write(self.go_fd, b"1")
        finally:
            os.close(self.go_fd)


def panel_children(cfg: SiteConfig, *, uplink_env: Mapping[str, str] | None = None, uplink_log: str | None = None,
                   sms_log: str | None = None) -> list[ChildSpec]:
    """The panel's children: the storage/uplink process, and the SMS process when ``[sms]`` is configured (its
    validated settings in its environment)."""
    children = [ChildSpec("uplink", "gateway.uplink.process", uplink_env, uplink_log)]
    if cfg.sms is not None:
        children.append(ChildSpec(
            "sms", "gateway.sms.process",
            {**(os.environ if uplink_env is None else uplink_env), **SmsSettings.of(cfg).environment()},
            sms_log or (os.path.join(os.path.dirname(uplink_log), "sms.log") if uplink_log else None)))
    return children
