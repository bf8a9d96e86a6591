"""Soak: the real service with 64 detectors for an hour; does any of its processes keep growing?

``gatewayd --config site.toml`` runs as a subprocess (``GPIOZERO_PIN_FACTORY=mock``) with a private
mosquitto, polling 64 simulated profile-A gas detectors at 1 Hz on one RS-485 bus (pymodbus's server on a
pseudo-terminal, in a child process — :mod:`simbus`). Once every detector has been read, every process of the
service (gatewayd, the panel, and its storage/uplink child) is sampled every ``--interval`` seconds: PSS
(each shared page split between the processes mapping it), USS, RSS (psutil ``memory_full_info``) and CPU.

With ``--misbehaving`` one detector (the last address) cycles through being silent (timeouts), answering
with garbled frames (bad CRC) and reporting an unknown status code, 15 s a round (``simbus.MISBEHAVIOUR``),
so the bus thread's error paths and the fault events they raise and clear run all along.

Growth is measured after a warm-up (``--warmup-minutes``, 5 by default: imports, first telemetry, SQLite's
page cache and the allocator's arenas settle first): ``pss_growth_mb_per_h_after_5min`` is the
least-squares slope of PSS over the samples after it, per process and for the sum; ``..._end_minus_5min``
is (last − value at the warm-up's end) scaled to an hour. The target is < 1 MB/h per process. PSS also moves
when *other* processes map or unmap the same files (every Python on the machine shares the interpreter's
pages), so the USS slope (pages of that process alone) is given beside it; other processes mapping the same
files move USS too, so the slope of anonymous memory (``RssAnon``: the heaps, SQLite's cache) is given as
well, which no other process moves. A restarted
storage process (its pid changed) is reported: its series then joins two processes.

Prints a row per sample as it goes, a table at the end and, last, one JSON line.
``.venv/bin/python benchmarks/soak.py [--minutes 60] [--devices 64] [--misbehaving]``
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import site_toml
from service import DaemonLog, ServiceSampler, process, start_gatewayd, stop_gatewayd
from simbus import SimBuses

from tests.support.broker import MosquittoBroker

BUS = "rs485-1"
TARGET_MB_PER_H = 1.0


def slope_per_hour(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (minute, MB) points, in MB per hour; None with fewer than 2 distinct minutes."""
    if len(points) < 2:
        return None
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    if sxx == 0:
        return None
    return 60 * sum((x - mx) * (y - my) for x, y in points) / sxx


def _growth(points: list[tuple[float, float]], warmup: float) -> dict[str, Any]:
    """PSS at the warm-up's end and at the end; growth after the warm-up, as a slope and as end − start."""
    after = [(t, v) for t, v in points if t >= warmup]
    if not after:
        return {"pss_mb_at_warmup": None, "pss_mb_end": round(points[-1][1], 2) if points else None,
                "pss_growth_mb_per_h_after_5min": None, "pss_growth_mb_per_h_end_minus_5min": None}
    (t5, v5), (t_end, v_end) = after[0], after[-1]
    slope = slope_per_hour(after)
    return {
        "pss_mb_at_warmup": round(v5, 2),
        "pss_mb_end": round(v_end, 2),
        "pss_growth_mb_per_h_after_5min": None if slope is None else round(slope, 3),
        "pss_growth_mb_per_h_end_minus_5min": round(60 * (v_end - v5) / (t_end - t5), 3) if t_end > t5 else None,
    }


class _Stop(Exception):
    pass


def _on_signal(signum: int, _frame: Any) -> None:
    raise _Stop(signal.Signals(signum).name)


def run(args: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="bench-soak-"))
    print(f"workdir: {workdir}", flush=True)
    addresses = list(range(1, args.devices + 1))
    misbehaving = ((BUS, addresses[-1]),) if args.misbehaving else ()
    sim = SimBuses(workdir / "sim", {BUS: addresses}, misbehaving=misbehaving)
    port = sim.start()[BUS]
    broker = MosquittoBroker(workdir / "broker")
    broker.start()
    db_path = workdir / "gateway.db"
    config = workdir / "site.toml"
    config.write_text(site_toml(buses={BUS: (port, addresses)}, mqtt_port=broker.port, db_path=db_path,
                                realtime_priority=args.realtime_priority, bus_timeout_s=0.3), encoding="utf-8")
    log_path = workdir / "gatewayd.log"
    proc = start_gatewayd(config, log_path)
    panel = process(proc.pid)
    log = DaemonLog(log_path)
    sampler = ServiceSampler(panel)
    samples: list[dict[str, Any]] = []
    stopped_by: str | None = None
    exited: int | None = None
    started = time.monotonic()
    try:
        log.wait(lambda e: e.get("event") == "uplink connected", 90)
        seen: set[str] = set()
        healthy = {f"gas-{BUS}-{a}" for a in addresses if (BUS, a) not in misbehaving}

        def all_read(entry: dict[str, Any]) -> bool:
            if entry.get("event") == "reading":
                seen.add(entry.get("device", ""))
            return healthy <= seen

        log.wait(all_read, 120)
        log.forget()
        warm_s = time.monotonic() - started
        print(f"gatewayd pid {proc.pid}: every detector read after {warm_s:.1f} s; sampling every "
              f"{args.interval:.0f} s for {args.minutes:g} min", flush=True)
        print(f"{'min':>6} {'role':<8} {'pid':>7} {'pss_mb':>8} {'uss_mb':>8} {'rss_mb':>8} {'cpu_%':>6} "
              f"{'thr':>4}", flush=True)
        sampler.reset_cpu()
        t0 = time.monotonic()
        with (workdir / "samples.jsonl").open("w", encoding="utf-8", buffering=1) as out:
            while True:
                minute = (time.monotonic() - t0) / 60
                rows = sampler.sample()
                sample = {"minute": round(minute, 3), "processes": rows,
                          "db_mb": round(sum(f.stat().st_size for f in workdir.glob("gateway.db*")) / 2**20, 2)}
                samples.append(sample)
                out.write(json.dumps(sample) + "\n")
                for row in rows:
                    print(f"{minute:6.1f} {row['role']:<8} {row['pid']:>7} {row['pss_mb']:8.2f} {row['uss_mb']:8.2f} "
                          f"{row['rss_mb']:8.2f} {row['cpu_pct']:6.2f} {row['threads']:>4}", flush=True)
                if proc.poll() is not None:
                    exited = proc.returncode
                    print(f"gatewayd exited with {exited}", flush=True)
                    break
                if minute * 60 + 1e-6 >= args.minutes * 60:
                    break
                next_at = t0 + len(samples) * args.interval
                time.sleep(max(0.0, min(next_at, t0 + args.minutes * 60) - time.monotonic()))
    except _Stop as exc:
        stopped_by = str(exc)
        print(f"stopped early by {stopped_by}", flush=True)
    finally:
        killed = stop_gatewayd(proc, panel)
        sim.stop()
        broker.stop()
    return _report(args, samples, sampler, workdir, killed, stopped_by, exited, log_path,
                   misbehaving[0][1] if misbehaving else None)


def _report(args: argparse.Namespace, samples: list[dict[str, Any]], sampler: ServiceSampler, workdir: Path,
            killed: list[int], stopped_by: str | None, exited: int | None, log_path: Path,
            misbehaving: int | None) -> dict[str, Any]:
    warmup = args.warmup_minutes
    roles = ("panel", "storage")
    series: dict[str, list[tuple[float, float]]] = {role: [] for role in roles}
    uss: dict[str, list[tuple[float, float]]] = {role: [] for role in roles}
    anon: dict[str, list[tuple[float, float]]] = {role: [] for role in roles}
    totals: list[tuple[float, float]] = []
    pids: dict[str, list[int]] = {role: [] for role in roles}
    for s in samples:
        for row in s["processes"]:
            if row["role"] in series:
                series[row["role"]].append((s["minute"], row["pss_mb"]))
                uss[row["role"]].append((s["minute"], row["uss_mb"]))
                anon[row["role"]].append((s["minute"], row["anon_mb"]))
                if row["pid"] not in pids[row["role"]]:
                    pids[row["role"]].append(row["pid"])
        totals.append((s["minute"], sum(row["pss_mb"] for row in s["processes"])))
    measured_min = samples[-1]["minute"] if samples else 0.0
    processes = {}
    for role in roles:
        entry: dict[str, Any] = {"pid": pids[role][-1] if pids[role] else None, **_growth(series[role], warmup)}
        last = [row for row in samples[-1]["processes"] if row["role"] == role] if samples else []
        if last:
            entry |= {"uss_mb_end": round(last[0]["uss_mb"], 2), "rss_mb_end": round(last[0]["rss_mb"], 2),
                      "threads_end": last[0]["threads"],
                      "cpu_pct": round(100 * last[0]["cpu_s"] / (60 * measured_min), 3) if measured_min else None}
        uss_after = [(t, v) for t, v in uss[role] if t >= warmup]
        uss_slope = slope_per_hour(uss_after)
        entry["uss_growth_mb_per_h_after_5min"] = None if uss_slope is None else round(uss_slope, 3)
        anon_slope = slope_per_hour([(t, v) for t, v in anon[role] if t >= warmup])
        entry["anon_growth_mb_per_h_after_5min"] = None if anon_slope is None else round(anon_slope, 3)
        if len(pids[role]) > 1:
            entry["pids"] = pids[role]
        processes[role] = entry
    cpu_s = sum(row["cpu_s"] for row in samples[-1]["processes"]) if samples else 0.0
    restarted = len(pids["storage"]) > 1
    growths = [processes[r]["pss_growth_mb_per_h_after_5min"] for r in roles]
    met = (all(g is not None and g < TARGET_MB_PER_H for g in growths) if growths else False)
    mentions = 0
    if misbehaving is not None:
        needle = f'"gas-{BUS}-{misbehaving}"'.encode()
        with log_path.open("rb") as f:
            mentions = sum(1 for line in f if needle in line)
    total = _growth(totals, warmup)
    line: dict[str, Any] = {
        "minutes": round(measured_min, 2),
        "minutes_asked": args.minutes,
        "devices": args.devices,
        "misbehaving_device": f"gas-{BUS}-{misbehaving}" if misbehaving is not None else None,
        "warmup_minutes": warmup,
        "interval_s": args.interval,
        "samples": len(samples),
        "processes": processes,
        "total_pss_mb_at_warmup": total["pss_mb_at_warmup"],
        "total_pss_mb_end": total["pss_mb_end"],
        "total_pss_growth_mb_per_h_after_5min": total["pss_growth_mb_per_h_after_5min"],
        "total_pss_growth_mb_per_h_end_minus_5min": total["pss_growth_mb_per_h_end_minus_5min"],
        "cpu_pct": round(100 * cpu_s / (60 * measured_min), 3) if measured_min else None,
        "storage_restarted": restarted,
        "storage_pids": pids["storage"],
        "db_mb_end": samples[-1]["db_mb"] if samples else None,
        "target": {"pss_growth_mb_per_h": f"< {TARGET_MB_PER_H:g} per process"},
        "target_met": met,
        "gatewayd_exit": exited,
        "stopped_early_by": stopped_by,
        "orphans_killed": killed,
        "workdir": str(workdir),
    }
    if misbehaving is not None:
        line["misbehaving_log_lines"] = mentions
    return line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=60.0, help="how long to sample after warm-up")
    parser.add_argument("--devices", type=int, default=64)
    parser.add_argument("--interval", type=float, default=30.0, help="seconds between samples")
    parser.add_argument("--misbehaving", action="store_true",
                        help="one detector goes silent, garbles its frames and reports a bad status, in turn")
    parser.add_argument("--realtime-priority", type=int, default=50, help="runtime.realtime_priority")
    parser.add_argument("--warmup-minutes", type=float, default=5.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    line = run(args)
    print()
    print(f"{'process':<8} {'pid':>7} {'pss@warm':>9} {'pss_end':>8} {'MB/h fit':>9} {'MB/h e-s':>9} {'cpu_%':>6}")
    for role, p in line["processes"].items():
        def fmt(v: Any, width: int, spec: str) -> str:
            return f"{v:{width}{spec}}" if isinstance(v, (int, float)) else f"{'-':>{width}}"

        print(f"{role:<8} {fmt(p['pid'], 7, 'd')} {fmt(p['pss_mb_at_warmup'], 9, '.2f')} "
              f"{fmt(p['pss_mb_end'], 8, '.2f')} {fmt(p['pss_growth_mb_per_h_after_5min'], 9, '.3f')} "
              f"{fmt(p['pss_growth_mb_per_h_end_minus_5min'], 9, '.3f')} {fmt(p.get('cpu_pct'), 6, '.2f')}")
    print(f"{'total':<8} {'':>7} {line['total_pss_mb_at_warmup'] or 0:9.2f} {line['total_pss_mb_end'] or 0:8.2f} "
          f"{line['total_pss_growth_mb_per_h_after_5min'] or 0:9.3f} "
          f"{line['total_pss_growth_mb_per_h_end_minus_5min'] or 0:9.3f} {line['cpu_pct'] or 0:6.2f}")
    print(f"growth measured after minute {line['warmup_minutes']:g}; target < {TARGET_MB_PER_H:g} MB/h per "
          f"process: {'met' if line['target_met'] else 'MISSED'}"
          + ("; the storage process was RESTARTED (pids " + ", ".join(map(str, line["storage_pids"])) + ")"
             if line["storage_restarted"] else ""))
    print(f"logs: {line['workdir']}")
    print(json.dumps(line), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
