"""Heartbeats: deadlines, staleness and ages, with an explicit clock."""

from __future__ import annotations

import threading

import pytest

from gateway.health import Heartbeats


def test_registered_part_counts_from_registration() -> None:
    hb = Heartbeats()
    hb.register("bus0", 2.0, now=100.0)
    assert hb.stale(now=101.0) == []
    assert hb.stale(now=102.5) == ["bus0"]
    assert hb.snapshot(now=101.5) == {"bus0": 1.5}


def test_beat_refreshes_and_silence_goes_stale() -> None:
    hb = Heartbeats()
    hb.register("annunciator", 1.0, now=0.0)
    hb.register("uplink", 5.0, now=0.0)
    hb.beat("annunciator", now=3.0)
    # uplink has not beaten but its deadline is longer
    assert hb.stale(now=3.5) == []
    assert hb.stale(now=4.5) == ["annunciator"]
    assert hb.stale(now=6.0) == ["annunciator", "uplink"]
    hb.beat("annunciator", now=6.0)
    hb.beat("uplink", now=6.0)
    assert hb.stale(now=6.5) == []


def test_stale_is_sorted() -> None:
    hb = Heartbeats()
    for name in ["zeta", "alpha", "mid"]:
        hb.register(name, 1.0, now=0.0)
    assert hb.stale(now=10.0) == ["alpha", "mid", "zeta"]


def test_unregister_and_unknown_beats() -> None:
    hb = Heartbeats()
    hb.register("bus0", 1.0, now=0.0)
    hb.beat("never-registered", now=0.5)
    assert hb.names() == ["bus0"]
    hb.unregister("bus0")
    hb.unregister("bus0")  # twice is fine
    assert hb.stale(now=100.0) == []
    assert hb.snapshot(now=100.0) == {}


def test_reregister_resets_clock() -> None:
    hb = Heartbeats()
    hb.register("bus0", 1.0, now=0.0)
    assert hb.stale(now=5.0) == ["bus0"]
    hb.register("bus0", 1.0, now=5.0)
    assert hb.stale(now=5.5) == []


def test_rejects_non_positive_deadline() -> None:
    with pytest.raises(ValueError):
        Heartbeats().register("bus0", 0)


def test_default_clock_is_monotonic() -> None:
    hb = Heartbeats()
    hb.register("bus0", 3600.0)
    hb.beat("bus0")
    assert hb.stale() == []
    ages = hb.snapshot()
    assert list(ages) == ["bus0"]
    assert 0.0 <= ages["bus0"] < 3600.0


def test_concurrent_beats_and_reads() -> None:
    hb = Heartbeats()
    names = [f"part{i}" for i in range(8)]
    for name in names:
        hb.register(name, 3600.0)
    stop = threading.Event()
    errors: list[BaseException] = []

    def beater(name: str) -> None:
        try:
            while not stop.is_set():
                hb.beat(name)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=beater, args=(n,)) for n in names]
    for t in threads:
        t.start()
    try:
        for i in range(2000):
            assert hb.stale() == []
            assert set(hb.snapshot()) == set(names)
            extra = f"extra{i % 3}"
            hb.register(extra, 3600.0)
            hb.unregister(extra)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
    assert errors == []
