"""The command handler against a real in-process gateway: simulated bus on a pty, MockFactory pins,
real SQLite and a real mosquitto."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from gateway.config import load_config
from gateway.control.commands import COMMANDS, SCAN_PAUSE_MAX_S, SECRET_MASK, CommandHandler, CommandRejected
from gateway.panel.process import PanelProcess
from gateway_sim.bus import SimulatedBus
from gateway_sim.devices import SimulatedGasDetector
from gateway_sim.nullmodem import VirtualNullModem
from tests.support.broker import MosquittoBroker
from tests.support.building import running_gateway
from tests.support.site import ContactSpec, SiteSpec, build_site

RELAY_ID = "u1-gas-valve"
RELAY_PIN = 12
DOOR_ID = "u1-cabinet-door"
PASSWORD = "s3cret-Pa55word"


def site_toml(spec: SiteSpec, credentials: Path | None = None) -> str:
    """The generated site plus a relay (and optionally an MQTT credentials file)."""
    relay = f'\n[[outputs.relays]]\nid = "{RELAY_ID}"\npin = {RELAY_PIN}\nname = "Unit 1 gas valve"\n'
    toml = spec.toml.replace("\n[alarm]", relay + "\n[alarm]", 1)
    if credentials is not None:
        toml = toml.replace("\n[mqtt]\n", f'\n[mqtt]\ncredentials_file = "{credentials}"\n', 1)
    return toml


def write_site(directory: Path, *, bus_port: str, broker_port: int, households: int = 2) -> tuple[SiteSpec, Path]:
    """Site file with ``households`` profile-A detectors, a cabinet door contact, a relay and credentials."""
    credentials = directory / "mqtt-credentials.toml"
    credentials.write_text(f'username = "gw"\npassword = "{PASSWORD}"\n')
    credentials.chmod(0o600)
    spec = build_site(bus_port=bus_port, db_path=directory / "events.db", broker_port=broker_port,
                      socket_path=directory / "control.sock", households=households,
                      contacts=[ContactSpec(DOOR_ID, "cabinet_door", 13)])
    path = directory / "site.toml"
    path.write_text(site_toml(spec, credentials))
    return spec, path


def populate_bus(bus: SimulatedBus, spec: SiteSpec) -> list[SimulatedGasDetector]:
    """Configured detectors (profile A), plus an unconfigured profile-B detector at 5 and an I/O station at 6."""
    detectors = [bus.add_gas_detector(d.address, "A") for d in spec.detectors]
    bus.add_gas_detector(5, "B")
    bus.add_io_station(6)
    return detectors


@dataclass
class Site:
    gateway: PanelProcess
    bus: SimulatedBus
    detectors: list[SimulatedGasDetector]
    spec: SiteSpec
    config: Path

    @property
    def handler(self) -> CommandHandler:
        return self.gateway.commands

    @property
    def device_ids(self) -> list[str]:
        return [d.id for d in self.spec.detectors]


@contextlib.asynccontextmanager
async def running_site(directory: Path, broker: MosquittoBroker) -> AsyncIterator[Site]:
    """A started in-process gateway on a simulated bus (needs gpiozero's MockFactory installed)."""
    with VirtualNullModem(directory) as modem:
        spec, path = write_site(directory, bus_port=modem.gateway_port, broker_port=broker.port)
        bus = SimulatedBus(modem.device_port)
        detectors = populate_bus(bus, spec)
        with bus:
            async with running_gateway(load_config(path)) as gateway:
                site = Site(gateway, bus, detectors, spec, path)
                await wait_for(lambda: all(d["state"] == "normal" for d in site.gateway.panel.snapshot()["devices"]),
                               "every device answered")
                yield site


async def wait_for(predicate: Any, what: str, timeout: float = 20.0) -> Any:
    """Wait on the loop until ``predicate()`` (sync or async) is truthy."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for: {what}")
        await asyncio.sleep(0.05)


@pytest.fixture
async def site(tmp_path: Path, broker: MosquittoBroker, mock_pins: Any) -> AsyncIterator[Site]:
    async with running_site(tmp_path, broker) as s:
        yield s


async def stored(site: Site, **filters: Any) -> list[dict[str, Any]]:
    result = await site.handler.handle("events", {"limit": 1000, **filters}, source="test")
    assert result.ok, result.reason
    return list(result.data["events"])


async def stored_at_least(site: Site, n: int, **filters: Any) -> list[dict[str, Any]]:
    rows = await stored(site, **filters)
    return rows if len(rows) >= n else []


# ------------------------------------------------------------------------------------------- validation


HOSTILE: list[Any] = [None, True, 0, -1, 2**70, 1.5, float("inf"), "", "x" * 10_000, [], {}, [1, 2], {"a": {"b": []}}]


async def test_unknown_commands_and_malformed_args_are_rejected_never_raised(site: Site) -> None:
    h = site.handler
    for command in ["nope", "", "STATUS", None, 5, ["status"]]:
        result = await h.handle(command, {}, source="test")  # type: ignore[arg-type]
        assert not result.ok and result.reason and "unknown command" in result.reason
    for command in sorted(COMMANDS):
        for args in (None, [], "device", 3):
            result = await h.handle(command, args, source="test")  # type: ignore[arg-type]
            assert not result.ok and "args must be an object" in (result.reason or ""), (command, args)
        result = await h.handle(command, {"bogus": 1}, source="test")
        assert not result.ok and "unknown argument 'bogus'" in (result.reason or ""), (command, result)
    keyed = {
        "reset": ["device", "all"], "test": ["device", "all"], "events": ["limit", "since", "device", "household",
                                                                          "kind"],
        "read": ["device", "raw"], "scan": ["bus", "from", "to", "pause_polling"],
        "relay_test": ["output", "seconds"], "buzzer_test": ["seconds_per_pattern"],
    }
    rejected = 0
    for command, keys in keyed.items():
        for key in keys:
            for value in HOSTILE:
                result = await h.handle(command, {key: value}, source="test")
                assert isinstance(result.ok, bool)
                if not result.ok:
                    assert result.reason, (command, key, value)
                    rejected += 1
    assert rejected > 80
    # the alarm path is unaffected: no faults, and a detector's gas still raises an alarm at once
    await h.handle("reset", {"all": True}, source="test")  # ends the walk test {"all": True} started
    assert all(not d["faults"] for d in site.gateway.panel.snapshot()["devices"])
    site.detectors[0].set_concentration(30.0)
    await wait_for(lambda: site.gateway.panel.snapshot()["annunciation"].sound.name == "GAS", "gas sounding")


async def test_targets_need_exactly_one_of_device_or_all(site: Site) -> None:
    h = site.handler
    for command in ("reset", "test"):
        for args, fragment in [({}, "give 'device' or 'all'"), ({"all": False}, "give 'device' or 'all'"),
                               ({"device": site.device_ids[0], "all": True}, "not both"),
                               ({"device": "gas-nowhere"}, "unknown device 'gas-nowhere'"),
                               ({"device": 7}, "must be a non-empty string"), ({"all": "yes"}, "true or false")]:
            result = await h.handle(command, args, source="test")
            assert not result.ok and fragment in (result.reason or ""), (command, args, result)
            assert result.data == {}  # rejected, not failed


async def test_integers_refuse_booleans_and_ranges(site: Site) -> None:
    h = site.handler
    for args, fragment in [({"limit": True}, "must be an integer"), ({"limit": 0}, "must be 1–10000"),
                           ({"since": "yesterday"}, "ISO 8601"), ({"kind": "party"}, "unknown kind"),
                           ({"household": "u9-h999"}, "unknown household")]:
        result = await h.handle("events", args, source="test")
        assert not result.ok and fragment in (result.reason or ""), (args, result)


# ------------------------------------------------------------------------------------------- actions


async def test_silence_reset_and_test_record_their_source(site: Site) -> None:
    h = site.handler
    det = site.detectors[0]
    device = site.device_ids[0]
    det.set_concentration(30.0)
    await wait_for(lambda: site.gateway.panel.snapshot()["annunciation"].sound.name == "GAS", "gas sounding")
    result = await h.handle("silence", {}, source="mqtt:cmd-1")
    assert result.ok and result.data["sound"] == "quiet"
    refused = await h.handle("reset", {"device": device}, source="cli:uid=1000")
    assert not refused.ok and "still present" in (refused.reason or "")
    assert refused.data["still_active"] == [device]
    det.set_concentration(0.0)
    await wait_for(lambda: not site.gateway.panel.snapshot()["devices"][0]["condition_present"], "gas gone")
    done = await h.handle("reset", {"device": device}, source="cli:uid=1000")
    assert done.ok and done.data == {"reset": [device], "still_active": [], "tests_ended": []}
    walk = await h.handle("test", {"all": True}, source="mqtt:cmd-2")
    assert walk.ok and walk.data == {"started": [d.id for d in site.gateway.cfg.devices], "skipped": []}
    rows = await wait_for(lambda: stored(site, kind="test"), "test events stored")
    assert {r["source"] for r in rows if r["action"] == "started"} == {"mqtt:cmd-2"}
    silenced = await wait_for(lambda: stored(site, kind="silence"), "silence stored")
    assert silenced[-1]["source"] == "mqtt:cmd-1"
    resets = await wait_for(lambda: stored(site, kind="reset"), "reset stored")
    assert resets[-1]["source"] == "cli:uid=1000" and resets[-1]["device"] == device


def device_state(site: Site, device: str) -> str:
    return next(str(d["state"]) for d in site.gateway.panel.snapshot()["devices"] if d["device"] == device)


async def test_a_walk_test_skips_a_device_in_a_latched_present_gas_alarm_and_says_why(site: Site) -> None:
    h = site.handler
    alarmed, other = site.device_ids[0], site.device_ids[1]
    site.detectors[0].set_concentration(30.0)
    await wait_for(lambda: device_state(site, alarmed) == "high_alarm", "gas alarm latched")
    walk = await h.handle("test", {"all": True}, source="cli:uid=0")
    assert walk.ok, walk.reason
    assert walk.data["skipped"] == [{"device": alarmed, "reason": "high alarm latched (condition present)"}]
    assert alarmed not in walk.data["started"] and other in walk.data["started"]
    assert device_state(site, alarmed) == "high_alarm" and device_state(site, other) == "test"
    status = await h.handle("status", {}, source="test")
    row = next(d for d in status.data["devices"] if d["device"] == alarmed)
    assert (row["state"], row["faults"]) == ("high_alarm", [])  # never shown as a test, nor as a fault
    one = await h.handle("test", {"device": alarmed}, source="cli:uid=0")
    assert not one.ok and one.reason == (f"test: {alarmed}: not started: high alarm latched (condition present); "
                                         "a walk test would hide it")
    assert one.data["started"] == [] and not one.data.get("failed")
    started = [r for r in await stored(site, kind="test") if r["action"] == "started"]
    assert alarmed not in {r["device"] for r in started}


async def test_reset_reports_the_walk_tests_it_ended_not_nothing(site: Site) -> None:
    h = site.handler
    device = site.device_ids[0]
    assert (await h.handle("test", {"device": device}, source="test")).ok
    ended = await h.handle("reset", {"all": True}, source="test")
    assert ended.ok and ended.data == {"reset": [], "still_active": [], "tests_ended": [device]}
    assert device_state(site, device) == "normal"


async def test_a_scan_pauses_polling_in_bounded_windows_with_a_trouble_signal(site: Site) -> None:
    """A scan longer than the pause window: polling pauses window by window, every device is polled between
    two windows, and while paused the panel sounds trouble and lights its fault LED; status says so."""
    h = site.handler
    poller = site.gateway.buses["bus1"]
    panel = site.gateway.panel
    h.pause_window_s = 0.4  # each silent address takes at least one probe timeout (0.25 s)
    seen: list[tuple[bool, int, Any, list[str]]] = []
    statuses: list[dict[str, Any]] = []
    real = panel.polling_paused

    def watch(bus_id: str, paused: bool, source: str | None = None, detail: str | None = None) -> None:
        real(bus_id, paused, source, detail)
        snap = panel.snapshot()
        seen.append((paused, poller.polls, snap["annunciation"], [c["what"] for c in snap["active"]]))

    panel.polling_paused = watch  # type: ignore[method-assign]
    try:
        scan = asyncio.create_task(h.handle("scan", {"bus": "bus1", "from": 7, "to": 14, "pause_polling": True},
                                            source="cli:uid=0"))
        await wait_for(lambda: poller.paused, "polling paused")
        statuses.append((await h.handle("status", {}, source="test")).data)
        result = await asyncio.wait_for(scan, 60)
    finally:
        panel.polling_paused = real  # type: ignore[method-assign]
    assert result.ok, result.reason
    windows = result.data["pause_windows"]
    assert windows >= 2, result.data
    assert [p for p, *_ in seen] == [True, False] * windows
    for paused, _polls, annunciation, active in seen:
        if paused:
            assert annunciation.sound.name == "TROUBLE" and "fault" in annunciation.leds
            assert "trouble:polling_paused" in active
        else:
            assert "trouble:polling_paused" not in active
    for (_, resumed_at, *_), (_, paused_at, *_) in zip(seen[1::2], seen[2::2], strict=False):
        assert paused_at - resumed_at >= len(poller.polled), "every device polled between two windows"
    bus = statuses[0]["buses"][0]
    assert bus["paused"] and bus["scanning"]
    assert statuses[0]["annunciator"]["sound"] == "trouble" and "fault" in statuses[0]["annunciator"]["leds"]
    assert not poller.paused and panel.snapshot()["annunciation"].sound.name == "QUIET"

    async def recorded() -> list[dict[str, Any]]:
        rows = [r for r in await stored(site, kind="system") if r["code"] in ("polling_paused", "polling_resumed")]
        return rows if len(rows) == 2 * windows else []

    rows = await wait_for(recorded, "every pause and resume recorded")
    assert [r["action"] for r in rows] == ["paused", "resumed"] * windows
    assert {r["source"] for r in rows} == {"cli:uid=0"}


def test_a_scan_never_pauses_longer_than_thirty_seconds() -> None:
    assert SCAN_PAUSE_MAX_S == 30.0
    assert CommandHandler(object(), pause_window_s=120).pause_window_s == 30.0  # type: ignore[arg-type]


async def test_status_reports_gateway_uplink_annunciator_and_devices(site: Site, broker: MosquittoBroker) -> None:
    await wait_for(lambda: site.gateway.uplink_connected, "uplink connected")
    result = await site.handler.handle("status", {}, source="test")
    assert result.ok
    d = result.data
    assert d["gateway"]["id"] == "test-community-b01" and d["gateway"]["pid"] == os.getpid()
    uplink_process = d["gateway"]["uplink_process"]  # the storage/uplink half runs in a child of the panel
    assert uplink_process["state"] == "up" and uplink_process["pid"] not in (None, os.getpid())
    assert d["uplink"]["connected"] is True and d["uplink"]["broker"] == f"127.0.0.1:{broker.port}"
    assert isinstance(d["uplink"]["backlog"], int)
    assert set(d["storage"]["evicted_undelivered"]) == {"telemetry", "info", "trouble", "supervisory", "alarm"}
    assert d["annunciator"] == {"sound": "quiet", "pattern": None, "buzzer_on": False, "leds": [],
                                "relays": {RELAY_ID: False}}
    rows = {row["device"]: row for row in d["devices"]}
    first = rows[site.device_ids[0]]
    assert first["household"] == site.spec.detectors[0].household and first["unit"] == "u1"
    assert first["kind"] == "gas_detector" and first["state"] == "normal" and first["value"] == 0.0
    assert first["measure"] == "%LEL" and first["faults"] == [] and first["last_seen_age_s"] < 10
    assert rows[DOOR_ID]["kind"] == "cabinet_door"
    assert d["buses"][0]["id"] == "bus1" and d["buses"][0]["paused"] is False


async def test_read_gives_a_fresh_reading_and_raw_registers(site: Site) -> None:
    det = site.detectors[1]
    det.set_concentration(7.5)
    result = await site.handler.handle("read", {"device": site.device_ids[1], "raw": True}, source="test")
    assert result.ok, result.reason
    assert result.data["value"] == 7.5 and result.data["status"] == ["normal"] and result.data["gas"] == "CH4"
    assert result.data["raw"] == {"function": 3, "start": 0, "registers": det.registers()}
    contact = await site.handler.handle("read", {"device": DOOR_ID}, source="test")
    assert contact.ok and contact.data["kind"] == "cabinet_door" and contact.data["active"] is False
    site.bus.responding(det.slave, False)
    try:
        silent = await site.handler.handle("read", {"device": site.device_ids[1]}, source="test")
    finally:
        site.bus.responding(det.slave, True)
    assert not silent.ok and silent.data.get("failed") is True and "no valid answer" in (silent.reason or "")
    missing = await site.handler.handle("read", {}, source="test")
    assert not missing.ok and "device: is required" in (missing.reason or "")


async def test_scan_refuses_while_polling_then_finds_and_guesses_profiles(site: Site) -> None:
    h = site.handler
    refused = await h.handle("scan", {"bus": "bus1", "from": 1, "to": 7}, source="test")
    assert not refused.ok and "pause_polling" in (refused.reason or "")
    assert not site.gateway.buses["bus1"].paused
    unknown = await h.handle("scan", {"bus": "bus9"}, source="test")
    assert not unknown.ok and "unknown bus 'bus9'" in (unknown.reason or "")
    backwards = await h.handle("scan", {"bus": "bus1", "from": 9, "to": 3, "pause_polling": True}, source="test")
    assert not backwards.ok and "must not be above" in (backwards.reason or "")
    updates: list[dict[str, Any]] = []
    result = await h.handle("scan", {"bus": "bus1", "from": 1, "to": 7, "pause_polling": True},
                            source="cli:uid=0", progress=updates.append)
    assert result.ok, result.reason
    found = {r["address"]: (r["profile"], r["configured_as"]) for r in result.data["responders"]}
    assert found == {1: ("A", site.device_ids[0]), 2: ("A", site.device_ids[1]), 5: ("B", None),
                     6: ("io-station", None)}
    assert [u["done"] for u in updates] == list(range(1, 8)) and updates[-1]["total"] == 7
    assert updates[-1]["found"] == 4
    assert not site.gateway.buses["bus1"].paused
    async def paused_and_resumed() -> list[dict[str, Any]]:
        rows = await stored(site, kind="system")
        return rows if [r["action"] for r in rows][-2:] == ["paused", "resumed"] else []

    system = await wait_for(paused_and_resumed, "pause and resume recorded")
    assert system[-1]["source"] == "cli:uid=0"


async def test_buzzer_test_plays_every_pattern_but_never_over_an_alarm(site: Site, mock_pins: Any) -> None:
    buzzer = mock_pins.pin(site.spec.buzzer_pin)
    buzzer.clear_states()
    result = await site.handler.handle("buzzer_test", {"seconds_per_pattern": 0.3}, source="test")
    assert result.ok, result.reason
    assert result.data["patterns"] == ["temporal-4", "temporal-3", "supervisory", "trouble", "test"]
    assert sum(1 for s in buzzer.states if s.state) >= 5  # every pattern switched the buzzer on
    site.detectors[0].set_concentration(30.0)
    await wait_for(lambda: site.gateway.panel.snapshot()["annunciation"].sound.name == "GAS", "gas sounding")
    refused = await site.handler.handle("buzzer_test", {}, source="test")
    assert not refused.ok and "signalling gas" in (refused.reason or "")
    too_long = await site.handler.handle("buzzer_test", {"seconds_per_pattern": 60}, source="test")
    assert not too_long.ok and "0.1–5" in (too_long.reason or "")


async def test_a_real_alarm_ends_a_buzzer_test_at_once(site: Site) -> None:
    task = asyncio.create_task(site.handler.handle("buzzer_test", {"seconds_per_pattern": 5}, source="test"))
    await wait_for(lambda: site.gateway.annunciator.sound_pattern == "temporal-4", "first test pattern playing")
    site.detectors[1].set_concentration(30.0)
    # the first pattern alone lasts 5 s; the alarm must end the test well before that
    result = await asyncio.wait_for(task, 3.0)
    assert not result.ok and result.data["failed"] is True and "must signal gas" in (result.reason or "")
    assert result.data["played"] == ["temporal-4"]
    assert site.gateway.annunciator.current.sound.name == "GAS"
    await wait_for(lambda: site.gateway.annunciator.sound_pattern == "temporal-4", "gas pattern on the sounder")
    ended = await wait_for(lambda: stored_at_least(site, 2, kind="test"), "buzzer test start and end stored")
    assert ended[-1]["action"] == "ended" and "stopped" in ended[-1]["detail"]


async def test_relay_test_switches_the_relay_and_restores_it(site: Site, mock_pins: Any) -> None:
    pin = mock_pins.pin(RELAY_PIN)
    task = asyncio.create_task(site.handler.handle("relay_test", {"output": RELAY_ID, "seconds": 0.5},
                                                   source="cli:uid=0"))
    await wait_for(lambda: pin.state, "relay on")
    result = await task
    assert result.ok and result.data == {"output": RELAY_ID, "seconds": 0.5, "left_on_by_linkage": False}
    assert not pin.state
    rows = await wait_for(lambda: stored_at_least(site, 2, kind="relay"), "relay on and off stored")
    assert [(r["action"], r["code"], r["source"]) for r in rows] == [("on", RELAY_ID, "cli:uid=0"),
                                                                     ("off", RELAY_ID, "cli:uid=0")]
    unknown = await site.handler.handle("relay_test", {"output": "fan"}, source="test")
    assert not unknown.ok and "unknown relay 'fan'" in (unknown.reason or "")


async def test_config_show_masks_the_password(site: Site) -> None:
    result = await site.handler.handle("config_show", {}, source="test")
    assert result.ok
    mqtt = result.data["config"]["mqtt"]
    assert mqtt["password"] == SECRET_MASK and mqtt["username"] == "gw"
    assert mqtt["credentials_file"].endswith("mqtt-credentials.toml")
    assert PASSWORD not in repr(result.data)
    assert result.data["config"]["devices"][0]["detector_profile"] == "A"


async def test_events_filters_and_follow_sees_a_new_alarm(site: Site) -> None:
    h = site.handler
    telemetry = await wait_for(lambda: stored(site, kind="telemetry", device=site.device_ids[0]), "telemetry")
    assert {r["device"] for r in telemetry} == {site.device_ids[0]}
    limited = await h.handle("events", {"limit": 1}, source="test")
    assert limited.ok and len(limited.data["events"]) == 1
    future = await h.handle("events", {"since": 4_000_000_000}, source="test")
    assert future.ok and future.data["events"] == []
    stream = h.follow({"kind": "alarm", "household": site.spec.detectors[1].household})
    site.detectors[1].set_concentration(12.0)
    row = await asyncio.wait_for(anext(stream), 20)
    assert (row["kind"], row["action"], row["device"], row["level"]) == ("alarm", "raised", site.device_ids[1], "low")
    assert row["event_id"].startswith("test-community-b01:")
    await stream.aclose()
    with pytest.raises(CommandRejected, match="unknown kind"):
        await anext(h.follow({"kind": "party"}))


async def test_rebirth_publishes_the_birth_again(site: Site, mqtt_recorder_factory: Any) -> None:
    await wait_for(lambda: site.gateway.uplink_connected, "uplink connected")
    birth = f"{site.spec.topic_base}/birth"
    recorder = mqtt_recorder_factory(topics=birth)
    recorder.wait_for(timeout=20)  # the retained birth
    recorder.clear()
    result = await site.handler.handle("rebirth", {}, source="mqtt:cmd-9")
    assert result.ok and result.data["topic"] == birth
    message = await asyncio.to_thread(recorder.wait_for, None, 20)
    assert message.json["gateway"] == "test-community-b01"
