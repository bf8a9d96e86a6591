"""GIL hand-off: how late a thread waking from I/O gets to run Python while other threads keep the GIL busy.

A bus thread returning from ``select`` or a GPIO callback thread woken by the kernel must win the GIL
before it can set the buzzer pin. CPython makes it wait up to the switch interval (``sys.setswitchinterval``,
5 ms by default) before the running thread is asked to hand over — per system call on the path. This
measures that wait for several switch intervals, with one or two pure-Python busy threads, for a waker at
normal priority and at SCHED_FIFO (when permitted): the lateness of a timed wake-up, and the time of two
further system calls (each gives the GIL away and must win it back). Last, what a shorter interval costs:
the extra time three busy threads need for the same work.

    .venv/bin/python benchmarks/gil_handoff.py [--wakes 500]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import threading
import time
from typing import Any

from common import percentile


def measure(interval_s: float, busy: int, fifo: int, wakes: int) -> dict[str, Any]:
    previous = sys.getswitchinterval()
    sys.setswitchinterval(interval_s)
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            pass

    spinners = [threading.Thread(target=spin, daemon=True) for _ in range(busy)]
    for t in spinners:
        t.start()
    lateness: list[float] = []
    syscalls: list[float] = []
    fifo_ok = [False]
    r, w = os.pipe()

    def waker() -> None:
        if fifo:
            try:
                os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(fifo))
                fifo_ok[0] = True
            except (AttributeError, PermissionError, OSError):
                pass
        for _ in range(wakes):
            target = time.perf_counter() + random.uniform(0.002, 0.01)
            time.sleep(max(0.0, target - time.perf_counter()))
            woke = time.perf_counter()
            lateness.append(woke - target)
            os.write(w, b"x")
            os.read(r, 1)
            syscalls.append(time.perf_counter() - woke)

    thread = threading.Thread(target=waker)
    thread.start()
    thread.join()
    stop.set()
    for t in spinners:
        t.join()
    os.close(r)
    os.close(w)
    sys.setswitchinterval(previous)
    return {
        "switch_interval_ms": interval_s * 1000, "busy_threads": busy, "fifo": fifo_ok[0],
        "wake_p50_ms": round(percentile(lateness, 50) * 1000, 3),
        "wake_p99_ms": round(percentile(lateness, 99) * 1000, 3),
        "wake_max_ms": round(max(lateness) * 1000, 3),
        "two_syscalls_p99_ms": round(percentile(syscalls, 99) * 1000, 3),
    }


def throughput_cost(interval_s: float, threads: int = 3, work: int = 3_000_000) -> float:
    """Seconds for ``threads`` busy threads to finish a fixed amount of pure-Python work."""
    previous = sys.getswitchinterval()
    sys.setswitchinterval(interval_s)

    def busy() -> None:
        x = 0
        for i in range(work):
            x += i

    workers = [threading.Thread(target=busy) for _ in range(threads)]
    start = time.perf_counter()
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    sys.setswitchinterval(previous)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wakes", type=int, default=500)
    parser.add_argument("--fifo", type=int, default=50, help="SCHED_FIFO priority of the waker (0 = normal)")
    args = parser.parse_args(argv)
    rows = []
    for interval_ms in (5.0, 1.0, 0.5, 0.25):
        for busy in (0, 1, 2):
            for fifo in sorted({0, args.fifo}):
                row = measure(interval_ms / 1000, busy, fifo, args.wakes)
                rows.append(row)
                print(f"interval {interval_ms:>4} ms  busy {busy}  fifo {row['fifo']!s:<5}  wake p50 "
                      f"{row['wake_p50_ms']:7.3f}  p99 {row['wake_p99_ms']:7.3f}  max {row['wake_max_ms']:7.3f}  "
                      f"2 syscalls p99 {row['two_syscalls_p99_ms']:7.3f} ms")
    base = min(throughput_cost(0.005) for _ in range(3))
    cost = {}
    for interval_ms in (1.0, 0.5, 0.25, 0.1):
        t = min(throughput_cost(interval_ms / 1000) for _ in range(3))
        cost[str(interval_ms)] = round(100 * (t / base - 1), 1)
        print(f"interval {interval_ms:>4} ms: three busy threads {cost[str(interval_ms)]:+.1f} % time vs 5 ms")
    print(json.dumps({"gil_handoff": rows, "busy_threads_extra_time_pct": cost}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
