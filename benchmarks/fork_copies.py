"""Which of the start-up heap's pages each of gatewayd's two processes copies after the fork, and what is on them.

With ``runtime.alarm_process`` on, ``gatewayd`` forks once all its modules are imported. Parent and child
then share every page of the start-up heap until one of them writes to it; each write copies the page.
This benchmark runs ``polling.py`` (64 simulated detectors at 1 Hz, a broker) with gatewayd started through
this file (``--daemon``), which records, just before the fork, the physical frame of each resident page
of the heap (``[heap]`` and anonymous mappings, from ``/proc/self/pagemap``) and where the start-up objects
live; ``--after`` seconds later it reads both processes' frames again. A page whose frame changed in a
process was copied by that process. Needs root (page frame numbers read as 0 otherwise).

Final JSON line: MB of start-up pages copied by the daemon only, the alarm process only, both, neither; the
MB those copies add; and, per group, the start-up objects on those pages by type (MB, ``sys.getsizeof``).
The record of objects (not counted among them) is itself start-up heap that neither process touches: it
inflates ``not_copied_mb``.
"""

from __future__ import annotations

import argparse
import array
import collections
import gc
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from common import mappings, resident_frames

PAGE = os.sysconf("SC_PAGE_SIZE")
GROUPS = {(False, False): "neither", (True, False): "daemon", (False, True): "alarm", (True, True): "both"}


class StartupObjects:
    """Address, size and type of the objects alive at the fork: gc-tracked ones and what they refer to."""

    def __init__(self) -> None:
        self.addresses = array.array("Q")
        self.sizes = array.array("Q")
        self.kinds = array.array("H")
        self.type_names: list[str] = []

    def record(self) -> None:
        index: dict[str, int] = {}
        seen = {id(x) for x in (self, vars(self), self.addresses, self.sizes, self.kinds, self.type_names)}
        for obj in gc.get_objects():
            for item in (obj, *gc.get_referents(obj)):
                if id(item) in seen:
                    continue
                seen.add(id(item))
                name = type(item).__name__
                if name not in index:
                    index[name] = len(self.type_names)
                    self.type_names.append(name)
                self.addresses.append(id(item))
                self.sizes.append(sys.getsizeof(item, 0))
                self.kinds.append(index[name])

    def by_type(self, pages: set[int]) -> dict[str, float]:
        """MB of these objects by type, for the objects that start on one of ``pages``."""
        total: collections.Counter[str] = collections.Counter()
        for address, size, kind in zip(self.addresses, self.sizes, self.kinds, strict=True):
            if address // PAGE * PAGE in pages:
                total[self.type_names[kind]] += size
        return {name: round(size / 2**20, 2) for name, size in total.most_common(8)}


def _report(objects: StartupObjects, before: dict[int, int], daemon: dict[int, int],
            alarm: dict[int, int]) -> dict[str, Any]:
    groups: dict[str, set[int]] = {name: set() for name in GROUPS.values()}
    for address, frame in before.items():
        groups[GROUPS[(daemon.get(address) != frame, alarm.get(address) != frame)]].add(address)
    mb = {name: round(len(pages) * PAGE / 2**20, 1) for name, pages in groups.items()}
    return {
        "startup_heap_mb": round(len(before) * PAGE / 2**20, 1),
        "copied_by_daemon_only_mb": mb["daemon"],
        "copied_by_alarm_only_mb": mb["alarm"],
        "copied_by_both_mb": mb["both"],
        "not_copied_mb": mb["neither"],
        "copies_add_mb": round(mb["daemon"] + mb["alarm"] + mb["both"], 1),
        "objects_on_copied_pages_mb": {name: objects.by_type(groups[name]) for name in ("daemon", "alarm", "both")},
    }


def run_daemon(argv: list[str]) -> int:
    """gatewayd, with a probe around its fork that writes its figures to ``$FORK_COPIES_OUT``."""
    from gateway import daemon

    out, after = Path(os.environ["FORK_COPIES_OUT"]), float(os.environ.get("FORK_COPIES_AFTER", "45"))
    objects = StartupObjects()
    real_freeze, real_fork = gc.freeze, os.fork

    def freeze() -> None:  # fork_alarm_process freezes the start-up objects just before it forks
        if not objects.addresses:
            objects.record()
        real_freeze()

    def fork() -> int:
        heap = mappings(os.getpid(), heap_only=True)
        before = resident_frames(os.getpid(), heap)
        pid = real_fork()
        if pid:
            def probe() -> None:
                time.sleep(after)
                figures = _report(objects, before, resident_frames(os.getpid(), heap), resident_frames(pid, heap))
                out.write_text(json.dumps(figures), encoding="utf-8")

            threading.Thread(target=probe, name="fork-copies", daemon=True).start()
        return pid

    gc.freeze, os.fork = freeze, fork  # type: ignore[assignment]
    return daemon.main(argv)


def main() -> int:
    if sys.argv[1:2] == ["--daemon"]:
        return run_daemon(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=64)
    parser.add_argument("--after", type=float, default=45.0, help="seconds after the fork to compare frames")
    args = parser.parse_args()
    out = Path(tempfile.mkdtemp(prefix="bench-fork-copies-")) / "figures.json"
    here = Path(__file__).resolve()
    cmd = [sys.executable, str(here.with_name("polling.py")), "--devices", str(args.devices),
           "--seconds", str(max(10, round(args.after))), "--alarm-process", "on",
           "--daemon-cmd", f"{sys.executable} {here} --daemon",
           "--daemon-env", f"FORK_COPIES_OUT={out}", "--daemon-env", f"FORK_COPIES_AFTER={args.after}"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    if not out.exists():
        print("gatewayd stopped before the probe ran: raise --after's margin or check polling.py", file=sys.stderr)
        return 1
    figures = json.loads(out.read_text(encoding="utf-8"))
    print(json.dumps({**figures, "devices": args.devices, "after_s": args.after}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
