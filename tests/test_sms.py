"""The SMS path's parts: the rule (gateway/sms/policy.py), contacts, messages, and the modem through the real
python-gammu against the simulated modem (tests/support/modem.py), decoded by Gammu's own decoder.

- A flapping detector (alarm on and off every 5 s for 10 minutes of simulated time, the real alarm core): each
  recipient stays within the hourly cap, and the first SMS of each new alarm episode is never held back.
- A 60-character Chinese alarm text goes as one part; a 200-character one as concatenated parts that Gammu
  joins back into the same text.
- Each failure the simulated modem offers gives a ``modem`` problem a technician can read.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from drivers.profiles import GasReading
from gateway.config import parse_config
from gateway.events import event_delivery_key
from gateway.logs import JournalRenderer
from gateway.panel.core import AlarmCore
from gateway.sms import logger
from gateway.sms.contacts import Contacts, ContactsError, Person, mask
from gateway.sms.messages import event_text, technician_test_text
from gateway.sms.modem import Modem, SendFailed
from gateway.sms.policy import Owed, SmsPolicy
from tests.support.modem import SimulatedModem, decode_submitted, reassemble
from tests.support.site import build_site

# ------------------------------------------------------------------------------------------ the rule


def owed(key: str, made: float, recipients: tuple[str, ...] = ("a",), kind: str = "alarm",
         action: str = "raised", device: str | None = "gas-1") -> Owed:
    return Owed(key, kind, action, device, made, recipients)


def test_an_event_falls_due_after_after_s_unless_acknowledged_first() -> None:
    policy = SmsPolicy(after_s=30.0)
    policy.owe(owed("k1", 100.0))
    policy.owe(owed("k2", 100.0, device="gas-2"))
    assert policy.due(129.9) == ([], [])
    assert policy.delivered(["k2"]) == ["k2"]
    send, held = policy.due(130.0)
    assert [(s.key, s.recipient, s.first) for s in send] == [("k1", "a", True)]
    assert held == [] and policy.owed() == 0 and policy.became_due == ["k1"]
    policy.owe(owed("nobody", 131.0, recipients=()))
    assert policy.due(161.0) == ([], []) and policy.became_due == ["nobody"] and policy.owed() == 0


def test_while_the_transmission_fault_is_present_and_in_always_mode_an_event_is_due_at_once() -> None:
    policy = SmsPolicy(after_s=30.0)
    policy.transmission_fault = True
    policy.owe(owed("k1", 100.0))
    assert [s.key for s in policy.due(100.0)[0]] == ["k1"]
    always = SmsPolicy(mode="always", after_s=30.0)
    always.owe(owed("k2", 100.0))
    assert [s.key for s in always.due(100.0)[0]] == ["k2"]


def test_over_the_cap_a_later_message_is_held_but_a_new_episode_s_first_is_not() -> None:
    policy = SmsPolicy(mode="always", max_per_hour=2)
    for n in range(4):
        policy.owe(owed(f"f{n}", float(n), kind="fault", device=None))
    send, held = policy.due(10.0)
    assert [s.key for s in send] == ["f0", "f1"] and [h.key for h in held] == ["f2", "f3"]
    policy.owe(owed("alarm", 11.0, device="gas-9"))
    send, held = policy.due(11.0)
    assert [(s.key, s.first) for s in send] == [("alarm", True)] and not held
    policy.owe(owed("again", 12.0, device="gas-9"))  # the same episode: held
    assert [h.key for h in policy.due(12.0)[1]] == ["again"]
    assert [s.key for s in policy.due(3700.0)[0]] == []  # nothing owed any more
    policy.owe(owed("later", 3700.0, kind="fault", device=None))
    assert [s.key for s in policy.due(3700.0)[0]] == ["later"], "the hour has passed: room again"


def test_a_flapping_detector_stays_within_the_cap_and_each_episode_s_first_sms_goes() -> None:
    spec = build_site(bus_port="/dev/null-bus", db_path="/tmp/x.db", broker_port=1883, socket_path="/tmp/x.sock")
    cfg = parse_config(tomllib.loads(spec.toml))
    device = cfg.devices[0]
    core = AlarmCore(cfg.devices, cfg.alarm)
    cap = 6
    policy = SmsPolicy(after_s=30.0, max_per_hour=cap)
    policy.transmission_fault = True  # the broker is down all along: every message is due at once
    contacts = Contacts(unit_heads={device.unit or "": [Person("head", "+861", "unit head")]},
                        relatives={device.household or "": [Person("rel", "+862", "relative")]})
    sent: dict[str, list[tuple[float, bool, str]]] = {}
    episodes: list[float] = []
    now = 0.0
    for step in range(120):  # 10 minutes, a change every 5 s
        now = step * 5.0
        gas = 30.0 if step % 2 == 0 else 0.0
        events = core.reading(device.id, GasReading(gas, "%LEL", frozenset()), now)
        if step % 24 == 1:  # every 2 minutes someone resets it while it is clear: a new episode
            reset, result = core.reset(None, now, "cli")
            assert result.reset == (device.id,)
            events += reset
        for event in events:
            if event.kind == "reset":
                policy.reset(event.device)
            elif SmsPolicy.wanted(event.kind, event.action):
                if event.kind == "alarm" and event.action == "raised" and event.detail is None:
                    episodes.append(now)
                people = contacts.whom(event.kind, event.unit, event.household)
                policy.owe(Owed(event_delivery_key(event), event.kind, event.action, event.device, now,
                                tuple(p.phone for p in people)))
        for message in policy.due(now)[0]:
            sent.setdefault(message.recipient, []).append((now, message.first, message.key))
    assert len(episodes) == 6  # the first raise and one after each of the 5 resets
    assert policy.held_back > 100, "the flapping was not held back"
    for recipient, messages in sent.items():
        firsts = [t for t, first, _ in messages if first]
        assert firsts == episodes, f"{recipient}: first SMS of each episode at once"
        others = [t for t, first, _ in messages if not first]
        assert len(others) <= cap, f"{recipient}: {len(others)} capped messages within an hour"
        assert len(messages) <= cap + len(episodes)


# ------------------------------------------------------------------------------------------ contacts


def write_contacts(tmp_path: Path, text: str, mode: int = 0o600) -> Path:
    path = tmp_path / "contacts.toml"
    path.write_text(text, encoding="utf-8")
    os.chmod(path, mode)
    return path


CONTACTS = """
[buildings."c/b1"]
head = { name = "Head", phone = "+86 139 0000 0001" }
[units."c/b1/u1"]
head = { name = "Unit head", phone = "+8613900000002" }
[households."c/b1/u1-h1"]
relatives = [{ name = "R1", phone = "+8613900000003" }, { name = "R2", phone = "+8613900000002" }]
[households."c/b2/u1-h1"]
relatives = [{ name = "Elsewhere", phone = "+8613900000009" }]
"""


def test_contacts_route_like_the_central_server_and_keep_to_this_building(tmp_path: Path) -> None:
    contacts = Contacts.load(write_contacts(tmp_path, CONTACTS), "c", "b1")
    assert [p.phone for p in contacts.whom("alarm", "u1", "u1-h1")] == ["+8613900000003", "+8613900000002"]
    assert [p.role for p in contacts.whom("supervisory", "u1", None)] == ["unit head"]
    assert [p.phone for p in contacts.whom("fault", "u1", "u1-h1")] == ["+8613900000001"]
    assert contacts.counts() == {"technicians": 0, "building_heads": 1, "unit_heads": 1, "relatives": 2}
    assert mask("+8613900000003") == "*********0003"


def test_a_contacts_file_others_can_read_is_refused_without_a_number(tmp_path: Path) -> None:
    with pytest.raises(ContactsError, match="chmod 600") as err:
        Contacts.load(write_contacts(tmp_path, CONTACTS, 0o640), "c", "b1")
    assert "139" not in str(err.value)
    with pytest.raises(ContactsError, match="not a phone number"):
        Contacts.load(write_contacts(tmp_path, '[units."c/b1/u1"]\nhead = { phone = "call me" }\n'), "c", "b1")


def test_messages_name_the_place_what_and_when_in_both_languages() -> None:
    event = {"kind": "alarm", "action": "raised", "level": "high", "value": 30.0, "measure": "%LEL",
             "unit": "u1", "household": "u1-h001", "wall": 1_800_000_000.0}
    zh = event_text(event, building="b01", language="zh")
    assert zh.startswith("【报警】b01楼u1单元u1-h001户：燃气浓度高 30%LEL") and len(zh) <= 70, zh
    en = event_text(event, building="b01", language="en")
    assert en.startswith("ALARM: bldg b01 unit u1 flat u1-h001: high gas 30 %LEL") and len(en) <= 160, en
    assert "测试" in technician_test_text(building="b01", language="zh")
    assert "TEST" in technician_test_text(building="b01", language="en")


# ------------------------------------------------------------------------------------------ the modem


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimulatedModem]:
    with SimulatedModem(tmp_path_factory.mktemp("modem"), send_delay_s=0.01) as modem:
        yield modem


@pytest.fixture(scope="module")
def modem(sim: SimulatedModem) -> Iterator[Modem]:
    m = Modem(sim.port)
    yield m
    m.close()


def test_a_60_character_chinese_text_goes_in_one_part(sim: SimulatedModem, modem: Modem) -> None:
    text = ("【报警】一号楼二单元三零一户：燃气浓度高，请立即开窗通风并关闭燃气阀门，不要开关电器，"
            "请尽快离开房间并拨打电话报警求助！！！")[:60]
    assert len(text) == 60
    before = len(sim.submitted_pdus())
    refs = modem.send("+8613900000001", text)
    new = sim.submitted_pdus()[before:]
    assert len(refs) == len(new) == 1
    decoded = decode_submitted(new[0])
    assert decoded["Number"] == "+8613900000001"
    assert decoded["Text"] == text and decoded["Coding"] == "Unicode_No_Compression"
    assert decoded["UDH"]["Type"] == "NoUDH"


def test_a_200_character_text_goes_in_parts_that_gammu_joins_back(sim: SimulatedModem, modem: Modem) -> None:
    text = ("燃气报警测试消息，" * 30)[:200]
    before = len(sim.submitted_pdus())
    refs = modem.send("+8613900000002", text)
    new = sim.submitted_pdus()[before:]
    assert len(refs) == len(new) == 3  # 67 UCS-2 characters per part with the concatenation header
    assert all(decode_submitted(p)["UDH"]["Type"] == "ConcatenatedMessages" for p in new)
    joined = reassemble(new)
    assert len(joined) == 1 and joined[0]["Text"] == text and joined[0]["Parts"] == 3


def test_a_refused_submission_is_an_error_and_the_next_one_goes(sim: SimulatedModem, modem: Modem) -> None:
    sim.fail_next_sends(1, code=500)
    before = len(sim.submitted_pdus())
    with pytest.raises(SendFailed, match="refused"):
        modem.send("+8613900000003", "hello")
    assert modem.send("+8613900000003", "hello")
    assert reassemble(sim.submitted_pdus()[before:])[0]["Text"] == "hello"


def break_modem(sim: SimulatedModem, fail: str) -> None:
    """Make the simulated modem fail in one of the ways a real one does (:data:`MODEM_FAILURES`)."""
    if fail in ("locked", "missing"):
        sim.sim = fail
    elif fail == "unregistered":
        sim.registered = False
    elif fail == "no_signal":
        sim.csq = 99
    elif fail == "silent":
        sim.silent = True
    elif fail == "refused":  # every message refused (no credit): the modem fault once REFUSALS_FAULT in a row
        sim.fail_next_sends(10**6, code=42)
    else:
        sim.unplug()


def mend_modem(sim: SimulatedModem) -> None:
    """Undo :func:`break_modem`: a ready SIM, registered, signal 60 %, answering, plugged in."""
    sim.sim, sim.registered, sim.csq, sim.silent = "ready", True, 20, False
    sim.fail_next_sends(0)
    sim.plug()


#: Each failure the simulated modem offers for the modem's health, which its check finds.
MODEM_FAILURES = ("locked", "missing", "unregistered", "no_signal", "unplugged", "silent")
#: Each failure :func:`break_modem` offers: those and ``+CMS ERROR`` on every message, which only sends find.
ALL_MODEM_FAILURES = (*MODEM_FAILURES, "refused")


@pytest.mark.parametrize(("fail", "problem"), [
    ("locked", "SIM locked (PIN needed)"),
    ("missing", "SIM missing"),
    pytest.param("unregistered", "not registered (NoNetwork)", marks=pytest.mark.slow),
    pytest.param("no_signal", "no signal", marks=pytest.mark.slow),
    pytest.param("unplugged", "port lost", marks=pytest.mark.slow),  # the fast set keeps the SIM's two
    pytest.param("silent", "modem not answering", marks=pytest.mark.slow),  # Gammu's 20 s timeout
])
def test_each_modem_failure_names_its_problem_and_clears_when_it_goes(
    sim: SimulatedModem, modem: Modem, fail: str, problem: str,
) -> None:
    assert modem.check().problem is None
    break_modem(sim, fail)
    try:
        health = modem.check()
        assert health.problem is not None and health.problem.startswith(problem), health
    finally:
        mend_modem(sim)
    health = modem.check()
    assert health.problem is None and health.operator == "CHINA MOBILE" and health.signal_percent == 60, health


# ------------------------------------------------------------------------------------------ doctor, udev


def _doctor_site(tmp_path: Path, port: str) -> object:
    from tests.support.sms import sms_site

    spec = build_site(bus_port="/dev/null-bus", db_path=tmp_path / "events.db", broker_port=1883,
                      socket_path=tmp_path / "control.sock")
    return sms_site(tmp_path, spec, port).cfg


@pytest.mark.slow  # fault injection, several seconds: CI runs it, the fast set does not
def test_doctor_names_the_modem_its_operator_and_signal_and_each_problem(tmp_path: Path, sim: SimulatedModem,
                                                                        modem: Modem) -> None:
    from gateway.ops.doctor import Daemon, check_sms

    modem.close()  # Gammu opens the port exclusively: the doctor's own look needs it free

    cfg = _doctor_site(tmp_path, sim.port)
    contacts, modem_line = list(check_sms(cfg, Daemon("/nonexistent")))  # type: ignore[arg-type]
    assert contacts.status == "ok" and "2 relatives" in contacts.detail and "+86" not in contacts.detail
    assert modem_line.status == "ok", modem_line
    for part in ("CHINA MOBILE", "signal 60 %", "SIM ready"):
        assert part in modem_line.detail, modem_line
    sim.sim = "missing"
    try:
        line = list(check_sms(cfg, Daemon("/nonexistent")))[-1]  # type: ignore[arg-type]
    finally:
        sim.sim = "ready"
    assert line.status == "FAIL" and "SIM missing" in line.detail and "insert the SIM" in (line.fix or "")


@pytest.mark.slow  # two Gammu start-ups against the simulated modem
def test_doctor_says_when_modemmanager_holds_the_port(tmp_path: Path, sim: SimulatedModem, modem: Modem) -> None:
    import subprocess
    import sys
    import time

    from gateway.ops.doctor import Daemon, check_sms, port_holders

    cfg = _doctor_site(tmp_path, sim.port)
    modem.close()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\n"
                               "open('/proc/self/comm', 'w').write('ModemManager')\n"
                               f"f = open({sim.port!r}, 'rb', buffering=0)\nprint('open', flush=True)\n"
                               "time.sleep(60)"], stdout=subprocess.PIPE)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == b"open"
        deadline = time.monotonic() + 10
        while not any(name == "ModemManager" for _, name in port_holders(sim.port)):
            assert time.monotonic() < deadline, "the holder never showed"
            time.sleep(0.05)
        line = list(check_sms(cfg, Daemon("/nonexistent")))[-1]  # type: ignore[arg-type]
    finally:
        holder.kill()
        holder.wait()
    assert line.status == "FAIL" and "ModemManager" in line.detail and f"pid {holder.pid}" in line.detail
    assert "ID_MM_PORT_IGNORE" in (line.fix or "")


def test_the_modem_udev_rule_tells_modemmanager_to_leave_the_port_alone() -> None:
    import re

    token = re.compile(r'^[A-Z_]+(\{[^}]+\})?(==|!=|\+=|-=|:=|=)"[^"]*"$')
    path = Path(__file__).resolve().parents[1] / "systemd" / "99-gateway-modem.rules"
    rules = [line for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
    assert rules
    for rule in rules:
        tokens = [t.strip() for t in rule.split(",")]
        assert all(token.match(t) for t in tokens), rule
        assert 'ENV{ID_MM_PORT_IGNORE}="1"' in tokens and 'SYMLINK+="ttyModem"' in tokens


# ------------------------------------------------------------------------------------------ the process's log lines

_SAME_LINE = """
import sys, structlog
from gateway.logs import configure_logging
from gateway.sms import logger
configure_logging(json=True)
structlog.contextvars.bind_contextvars(process="sms")
logger.configure(level="info", process="sms")
for log in (structlog.get_logger(), logger.get_logger()):
    log.debug("not written")
    log.info("sms sent", recipient="+86139****0101", parts=1, what="alarm:raised", ms=812)
    log.warning("sms held back: hourly cap reached", recipient=None, max_per_hour=10)
    try:
        raise ValueError("modem said no")
    except ValueError:
        log.exception("sms: modem step failed")
    sys.stdout.write("--\\n")
"""


def test_the_sms_process_writes_the_log_lines_the_other_processes_write_through_structlog() -> None:
    out = subprocess.run([sys.executable, "-c", _SAME_LINE], capture_output=True, text=True, timeout=60, check=True,
                         cwd=Path(__file__).resolve().parents[1]).stdout
    theirs, ours, _ = out.split("--\n")
    a = [json.loads(line) for line in theirs.splitlines()]
    b = [json.loads(line) for line in ours.splitlines()]
    assert len(a) == len(b) == 3
    for x, y in zip(a, b, strict=True):
        assert list(x) == list(y), (x, y)  # the same keys in the same order
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", y.pop("timestamp"))
        x.pop("timestamp")
        assert x == y
    assert b[2]["exception"].endswith("ValueError: modem said no")


def test_under_journald_the_sms_process_sends_the_native_entry_the_others_send(tmp_path: Path) -> None:
    path = str(tmp_path / "journal.sock")
    journal = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    journal.bind(path)
    journal.settimeout(5)
    sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    out = logger._Output()
    out.journal, out.journal_path, out.context = sender, path, {"process": "sms"}
    try:
        out.write("error", "modem fault", {"detail": "SIM missing\nline two", "signal": {"percent": 0}})
        ours = journal.recv(65536)
        entry = {"detail": "SIM missing\nline two", "signal": {"percent": 0}, "event": "modem fault",
                 "process": "sms", "level": "error", "timestamp": ours.split(b"GATEWAY_TIMESTAMP=")[1][:27].decode()}
        with pytest.raises(structlog.DropEvent):
            JournalRenderer(identifier="gatewayd", path=path)(None, "error", dict(entry))
        assert journal.recv(65536) == ours
    finally:
        sender.close()
        journal.close()


_LOADS = """
import os, sys
before = set(sys.modules)
from gateway.sms import process
from gateway.sms.settings import ENV
os.environ[ENV] = "not JSON"
code = process.main(["--config", "/nonexistent/site.toml", "--link-fd", "99"])
print(code, " ".join(sorted(set(sys.modules) - before)))
"""


def test_the_sms_process_loads_neither_structlog_nor_the_config_machinery_nor_pathlib() -> None:
    """What the process adds to the interpreter's own modules, up to reading its settings: structlog (with
    asyncio, ssl, logging) was about 5 MB of its memory, the site file's parser and the alarm core with their
    register maps about 3.5 MB more, pathlib with urllib.parse and ipaddress some more (``benchmarks/polling.py
    --modem``). In a development virtualenv pathlib is loaded before (by the editable install's finder)."""
    out = subprocess.run([sys.executable, "-c", _LOADS], capture_output=True, text=True, timeout=60, check=True,
                         cwd=Path(__file__).resolve().parents[1]).stdout.splitlines()
    code, *loaded = out[-1].split()
    assert code == "78" and json.loads(out[0])["event"] == "config error", out
    assert "gateway.sms.process" in loaded and "gateway.sms.logger" in loaded
    unwanted = {"structlog", "asyncio", "ssl", "logging", "gateway.config", "gateway.panel.core", "drivers.profiles",
                "pathlib", "urllib.parse", "ipaddress"}
    assert not set(loaded) & unwanted, set(loaded) & unwanted


def test_the_panel_hands_the_sms_process_its_validated_settings_in_the_environment(tmp_path: Path) -> None:
    from gateway.config import SiteConfig
    from gateway.sms.settings import ENV, SettingsError, SmsSettings

    cfg = _doctor_site(tmp_path, "/dev/ttyMODEM0")
    assert isinstance(cfg, SiteConfig) and cfg.sms is not None
    settings = SmsSettings.of(cfg)
    assert (settings.building, settings.device, settings.after_s) == (cfg.building, "/dev/ttyMODEM0", cfg.sms.after_s)
    assert SmsSettings.from_environment(settings.environment()) == settings
    assert SmsSettings.from_environment({}) is None  # started by hand: it reads the site file itself
    text = settings.environment()[ENV]
    with pytest.raises(SettingsError, match=r"missing \['pin'\], unknown \['pin_code'\]"):
        SmsSettings.from_environment({ENV: text.replace('"pin"', '"pin_code"')})
    with pytest.raises(SettingsError, match="not JSON"):
        SmsSettings.from_environment({ENV: text[:-1]})
