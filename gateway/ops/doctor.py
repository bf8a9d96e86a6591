"""``gatewayctl doctor``: a pre-flight and field check of one site, one line per check.

Each check is ``ok``, ``warn`` or ``FAIL``, and anything not ok carries the fix. It works with the daemon
stopped (a new site before its first start) and beside a running daemon: then the serial ports and pins belong
to the daemon, so the doctor asks it over the control socket (the ``status`` and ``read`` commands) instead of
opening them. Exit status: 0 when nothing failed (warnings allowed), 1 when a check failed (docs/cli.md).
"""

from __future__ import annotations

import fnmatch
import grp
import json
import os
import platform
import shutil
import socket
import sqlite3
import ssl
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

from gateway.clock import ASSUME_ENV, TIME_ERROR, TIMESYNC_FLAG, adjtimex_state
from gateway.config import INSTALLED_EXAMPLE, BusConfig, ConfigError, SiteConfig, load_config

__all__ = [
    "Check",
    "Daemon",
    "check_broker",
    "check_clock",
    "check_config",
    "check_device_filter",
    "check_gpio",
    "check_group",
    "check_platform",
    "check_serial",
    "check_service",
    "check_storage",
    "check_test_override",
    "run_doctor",
]

Status = Literal["ok", "warn", "FAIL"]
NET_TIMEOUT_S = 5.0
UNIT = "gatewayd.service"
#: The board's name on a Raspberry Pi (and other device-tree boards); absent on a PC.
BOARD_MODEL = Path("/proc/device-tree/model")
#: How a technician who may not read the site file gets to: the file is root:gateway 0640.
NOT_ALLOWED_FIX = "use sudo (sudo gatewayctl doctor), or join group gateway: sudo usermod -aG gateway $USER, " \
                  "then log in again"


@dataclass(frozen=True)
class Check:
    """One line of the report: ``fix`` says what to do when ``status`` is not ok."""

    name: str
    status: Status
    detail: str
    fix: str | None = None

    def line(self) -> str:
        text = f"{self.status:<4}  {self.name:<14} {self.detail}"
        return text + (f" — fix: {self.fix}" if self.fix and self.status != "ok" else "")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def ok(name: str, detail: str) -> Check:
    return Check(name, "ok", detail)


def warn(name: str, detail: str, fix: str) -> Check:
    return Check(name, "warn", detail, fix)


def fail(name: str, detail: str, fix: str) -> Check:
    return Check(name, "FAIL", detail, fix)


def _reason(exc: BaseException) -> str:
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return " ".join(str(text).split())


# ------------------------------------------------------------------------------------------- daemon


class Daemon:
    """The running daemon, reached over its control socket with ``connect`` (gatewayctl's ``ControlClient``).

    Nothing answering, or no ``connect`` at all, means the daemon is not running.
    """

    def __init__(self, socket_path: str, connect: Callable[[str], Any] | None = None) -> None:
        self.path = socket_path
        self.client: Any = None
        self.error: str | None = None
        if connect is None:
            return
        try:
            self.client = connect(socket_path)
        except Exception as exc:  # gatewayctl's DaemonUnavailable/CliError: not reachable
            self.error = str(exc)

    @property
    def running(self) -> bool:
        return self.client is not None

    def request(self, command: str, args: dict[str, Any]) -> dict[str, Any]:
        try:
            reply: dict[str, Any] = self.client.request(command, args, timeout=30.0)
        except Exception as exc:  # a lost connection is an answer too
            return {"ok": False, "reason": str(exc)}
        return reply

    def close(self) -> None:
        if self.client is not None:
            self.client.close()


# ------------------------------------------------------------------------------------------- checks


def board_model(model_file: Path = BOARD_MODEL) -> str | None:
    """The board's name from the device tree (``Raspberry Pi 4 Model B Rev 1.4``); None off such a board."""
    try:
        return model_file.read_bytes().rstrip(b"\0").decode(errors="replace").strip() or None
    except OSError:
        return None


def on_a_pi(model_file: Path = BOARD_MODEL) -> bool:
    return "Raspberry Pi" in (board_model(model_file) or "")


def check_platform(model_file: Path = BOARD_MODEL) -> Check:
    """What this runs on: the board, the OS release, the machine and the Python of the installed gateway."""
    try:
        release = platform.freedesktop_os_release().get("PRETTY_NAME", "unknown OS")
    except OSError:
        release = "unknown OS"
    board = board_model(model_file) or "not a Raspberry Pi (no device-tree model)"
    return ok("platform", f"{board}; {release}; {platform.machine()}; Python {platform.python_version()}")


def check_config(path: str, example: Path | None = INSTALLED_EXAMPLE) -> tuple[Check, SiteConfig | None]:
    """The site file on disk loads and validates (the same rules as ``gatewayctl config check``) and is no longer
    the shipped ``example``, which the service refuses to start."""
    try:
        Path(path).open("rb").close()
    except PermissionError:
        return fail("config", f"{path}: permission denied", NOT_ALLOWED_FIX), None
    except OSError:
        pass  # missing, or not a file: load_config names it
    try:
        cfg = load_config(path)
    except ConfigError as exc:
        return fail("config", str(exc), f"edit {path} at {exc.path}, then: gatewayctl config check {path}"), None
    try:
        unedited = example is not None and Path(path).read_bytes() == example.read_bytes()
    except OSError:
        unedited = False
    if unedited:
        return fail("config", f"{path} is still the shipped example, unchanged: the service refuses to start it",
                    f"sudoedit {path} for this building (docs/config.md), then: gatewayctl config check {path}"), None
    return ok("config", f"{path}: {cfg.gateway_id}, {len(cfg.devices)} devices, {len(cfg.buses)} buses"), cfg


def _configured_pins(cfg: SiteConfig) -> list[tuple[str, str]]:
    pins = [(cfg.outputs.buzzer.pin, "buzzer")]
    pins += [(led.pin, f"LED {colour}") for colour, led in cfg.outputs.leds.items()]
    pins += [(relay.pin, f"relay {relay.id}") for relay in cfg.outputs.relays]
    for dev in cfg.devices:
        if dev.pin is not None:
            pins.append((dev.pin, dev.id))
        if dev.supervision_pin is not None:
            pins.append((dev.supervision_pin, f"{dev.id} (supervision)"))
    return pins


def check_gpio(cfg: SiteConfig, daemon: Daemon, model_file: Path = BOARD_MODEL) -> Check:
    """The backend loads and opens its chip; no configured pin is held by something else. Mock pins on a
    Raspberry Pi fail: the buzzer, the LEDs and the relays would do nothing."""
    from drivers.gpio import GpioUnavailable, choose_pin_factory, make_pin_factory

    pins = _configured_pins(cfg)
    choice = choose_pin_factory(cfg.runtime.pin_factory)
    if choice.name == "mock" and on_a_pi(model_file):
        where = ("the environment (GPIOZERO_PIN_FACTORY)" if choice.source != "config"
                 else f"{cfg.runtime.pin_factory!r} in the site file")
        return fail("gpio", f"mock pins on a {board_model(model_file)}, from {where}: the buzzer, LEDs and relays "
                    "do nothing", '[runtime] pin_factory = "lgpio" in the site file (sudoedit it), '
                    "then: sudo systemctl restart gatewayd")
    if daemon.running:
        return ok("gpio", f"{choice.name}: {len(pins)} pins held by the running daemon")
    try:
        factory = make_pin_factory(choice.name)
    except GpioUnavailable as exc:
        return fail("gpio", exc.line, "on a Pi: is the user in group gpio, is it a Pi at all? off a Pi: "
                    "[runtime] pin_factory = \"mock\" (docs/config.md)")
    source = "" if choice.source == "config" else f" (from {choice.source})"
    try:
        if choice.name != "lgpio":
            return ok("gpio", f"{choice.name}{source}: {len(pins)} pins, nothing to hold them")
        from drivers.gpio import load_lgpio

        lgpio = load_lgpio()
        busy = []
        for pin, what in pins:
            _, _, flags, _, user = lgpio.gpio_get_line_info(factory._handle, int(pin.removeprefix("GPIO")))
            if flags & 1:  # "in use by the kernel": claimed by a driver or another process
                busy.append(f"{pin} ({what}) used by {user or 'another program'}")
        if busy:
            return fail("gpio", "pins in use: " + "; ".join(busy),
                        "stop what holds them (gpioinfo shows it) or remove their dtoverlay from config.txt")
        return ok("gpio", f"lgpio{source} on /dev/gpiochip{factory._chip}: {len(pins)} pins free")
    finally:
        factory.close()


def _answering(cfg: SiteConfig, bus: BusConfig) -> tuple[list[str], list[str]]:
    """Devices of ``bus`` that answer one read now, and why the others did not (port opened here)."""
    from drivers.modbus import CommError
    from gateway.panel.buses import open_client
    from gateway.panel.side import bus_drivers

    client = open_client(bus)
    if not client.connect():
        raise OSError(f"cannot open {bus.port}")
    answered, silent = [], []
    try:
        for driver in bus_drivers(cfg, bus.id):
            try:
                driver.poll(client)
            except CommError as exc:
                silent.append(f"{driver.device_id}@{driver.address}: {exc.reason}")
                continue
            answered.append(f"{driver.device_id}@{driver.address}")
            break  # one answer proves the line; the rest are the daemon's job
    finally:
        client.close()
    return answered, silent


def check_serial(cfg: SiteConfig, bus: BusConfig, daemon: Daemon) -> Check:
    """The port exists, opens, and at least one configured address on it answers."""
    name = f"serial {bus.id}"
    devices = cfg.bus_devices(bus.id)
    if daemon.running:
        return _serial_through_daemon(name, bus, [d.id for d in devices], daemon)
    real = os.path.realpath(bus.port)
    where = bus.port if real == bus.port else f"{bus.port} → {real}"
    if not os.path.exists(bus.port):
        return fail(name, f"{where}: no such device", "plug in the RS-485 adapter or enable the UART "
                    "(docs/deploy.md); ls -l /dev/serial/by-id/ names the adapters present")
    import serial

    try:
        serial.Serial(bus.port, baudrate=bus.baudrate, timeout=0, exclusive=True).close()
    except (serial.SerialException, OSError) as exc:
        return fail(name, f"{where}: cannot open: {_reason(exc)}",
                    "add the user to group dialout; stop whatever holds the port (fuser -v " + real + ")")
    if not devices:
        return warn(name, f"{where}: opens, but no device is configured on it", f"add devices with bus = {bus.id!r}")
    try:
        answered, silent = _answering(cfg, bus)
    except OSError as exc:
        return fail(name, f"{where}: {_reason(exc)}", "check the adapter")
    settings = f"{bus.baudrate} {bus.bytesize}{bus.parity}{bus.stopbits}"
    if answered:
        return ok(name, f"{where} at {settings}: {answered[0]} answers")
    return fail(name, f"{where} at {settings}: no configured address answers ({'; '.join(silent[:3])})",
                "check A/B wiring, termination, the baud rate and parity, and each device's address "
                f"(gatewayctl scan {bus.id} with the daemon running)")


def _serial_through_daemon(name: str, bus: BusConfig, device_ids: list[str], daemon: Daemon) -> Check:
    status = daemon.request("status", {})
    for entry in status.get("data", {}).get("buses", []):
        if entry.get("id") == bus.id and entry.get("port_lost"):
            return fail(name, f"{bus.port}: the daemon has lost the port", "check the adapter and its cable; "
                        "journalctl -u gatewayd says when it went")
    reasons = []
    for device in device_ids:
        reply = daemon.request("read", {"device": device, "raw": False})
        if reply.get("ok"):
            return ok(name, f"{bus.port} (asked the running daemon): {device} answers")
        reasons.append(f"{device}: {reply.get('reason')}")
    if not device_ids:
        return warn(name, f"{bus.port}: no device is configured on it", f"add devices with bus = {bus.id!r}")
    return fail(name, f"{bus.port} (asked the running daemon): no configured address answers "
                f"({'; '.join(reasons[:3])})", f"check the wiring; gatewayctl scan {bus.id} lists who answers")


def device_grant(major: int, minor: int, names: list[str], allowed: list[str]) -> str | None:
    """The ``DeviceAllow=`` entry that admits char device ``major:minor`` read-write, as systemd applies them
    (src/core/bpf-devices.c): ``char-N`` is major N, ``char-GLOB`` matches the driver names of /proc/devices
    (``names``: this major's), a path matches its node's numbers."""
    for entry in allowed:
        spec, _, access = entry.partition(" ")
        if not {"r", "w"} <= set(access):
            continue
        if spec.startswith("char-"):
            pattern = spec.removeprefix("char-")
            if int(pattern) == major if pattern.isdigit() else any(fnmatch.fnmatchcase(n, pattern) for n in names):
                return entry
        elif spec.startswith("/dev/"):
            try:
                node = os.stat(spec)
            except OSError:
                continue
            if stat.S_ISCHR(node.st_mode) and (os.major(node.st_rdev), os.minor(node.st_rdev)) == (major, minor):
                return entry
    return None


def check_device_filter(cfg: SiteConfig, daemon: Daemon, unit: str = UNIT,
                        proc_devices: Path = Path("/proc/devices")) -> Iterator[Check]:
    """Each configured serial port that is present passes the service's device filter (``DeviceAllow=``)."""
    ports = [(f"bus {b.id}", b.id, b.port) for b in cfg.buses] + ([("sms", None, cfg.sms.device)] if cfg.sms else [])
    present = [(what, bus, port, os.stat(port)) for what, bus, port in ports if os.path.exists(port)]
    present = [entry for entry in present if stat.S_ISCHR(entry[3].st_mode)]
    if not present or shutil.which("systemctl") is None:
        return
    out = subprocess.run(["systemctl", "show", unit, "--property=LoadState", "--property=DevicePolicy",
                          "--property=DeviceAllow"], capture_output=True, text=True, timeout=15, check=False).stdout
    lines = [line.split("=", 1) for line in out.splitlines() if "=" in line]
    values = dict(lines)
    if values.get("LoadState") != "loaded":
        return  # the service check says so
    allowed = [value for key, value in lines if key == "DeviceAllow"]
    policy = values.get("DevicePolicy", "auto")
    if policy == "auto" and not allowed:
        return
    if policy == "closed":
        allowed.append("char-pts rw")  # systemd's own base list under a closed policy
    names: dict[int, list[str]] = {}
    section = ""
    for line in proc_devices.read_text().splitlines():
        number, _, name = line.strip().partition(" ")
        if number.isdigit() and section == "Character devices:":
            names.setdefault(int(number), []).append(name.strip())
        elif line.endswith(":"):
            section = line
    lost = {b.get("id") for b in daemon.request("status", {}).get("data", {}).get("buses", []) if b.get("port_lost")} \
        if daemon.running else set()
    for what, bus, port, node in present:
        major, minor = os.major(node.st_rdev), os.minor(node.st_rdev)
        kind = "/".join(names.get(major, [])) or "no driver loaded"
        where = f"{port} (char {major}:{minor}, {kind})"
        grant = device_grant(major, minor, names.get(major, []), allowed)
        if grant is None:
            line = f"DeviceAllow=char-{names[major][0] if major in names else major} rw"
            yield fail(f"device filter {what}", f"{where}: {unit}'s DeviceAllow= does not admit it",
                       f"sudo systemctl edit {unit}, add [Service] {line}, then sudo systemctl restart {unit} "
                       "(docs/deploy.md, \"Adapters plugged in later\")")
        elif bus in lost and not grant.split()[0].removeprefix("char-").isdigit():
            yield fail(f"device filter {what}", f"{where}: admitted by name ({grant}), which systemd resolved when "
                       "the service started, and the daemon cannot open it: its driver was likely loaded after that",
                       f"sudo systemctl restart {unit}; have the driver loaded at boot "
                       "(/etc/modules-load.d/gateway-serial.conf)")
        else:
            yield ok(f"device filter {what}", f"{where}: admitted by {grant}")


def _tls_context(cfg: SiteConfig) -> ssl.SSLContext:
    m = cfg.mqtt
    context = ssl.create_default_context(cafile=m.tls_ca_file)
    if m.tls_cert_file:
        context.load_cert_chain(m.tls_cert_file, m.tls_key_file)
    if m.tls_insecure:
        context.check_hostname = False
    return context


def check_broker(cfg: SiteConfig) -> Iterator[Check]:
    """TCP, the TLS handshake with verification, the credentials, and a QoS 1 publish to the own ``status``, on
    every node of ``mqtt.hosts`` (each check's name then ends with the node)."""
    endpoints = cfg.mqtt.endpoints
    for host, port in endpoints:
        suffix = f" {host}:{port}" if len(endpoints) > 1 else ""
        for check in _check_node(cfg, host, port):
            yield replace(check, name=check.name + suffix)


def _check_node(cfg: SiteConfig, host: str, port: int) -> Iterator[Check]:
    m = cfg.mqtt
    where = f"{host}:{port}"
    try:
        sock = socket.create_connection((host, port), timeout=NET_TIMEOUT_S)
    except OSError as exc:
        key = "mqtt.hosts" if m.hosts else "mqtt.host and mqtt.port"
        yield fail("broker tcp", f"cannot connect to {where}: {_reason(exc)}",
                   f"check {key}, the network and the firewall (nc -vz {host} {port})")
        return
    yield ok("broker tcp", f"{where} accepts connections")
    with sock:
        if m.tls:
            try:
                with _tls_context(cfg).wrap_socket(sock, server_hostname=host) as tls:
                    version = tls.version()
            except (ssl.SSLError, OSError) as exc:
                yield fail("broker tls", f"handshake with {where} failed: {_reason(exc)}",
                           "mqtt.tls.ca_file must hold the CA that signed the broker's certificate, whose name "
                           "must match the node's host name; the clock must be right")
                return
            yield ok("broker tls", f"{version}, certificate verified" + (" (hostname NOT checked)"
                                                                         if m.tls_insecure else ""))
        else:
            yield warn("broker tls", "plain MQTT, not encrypted", "add [mqtt.tls] (docs/mqtt.md)")
    yield from _mqtt_session(cfg, host, port)


def _mqtt_session(cfg: SiteConfig, host: str, port: int) -> Iterator[Check]:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    from gateway.uplink.topics import Topics

    m = cfg.mqtt
    # Never the daemon's own client id: the broker would disconnect the running daemon to let the doctor in.
    client_id = f"{m.client_id or cfg.gateway_id}-doctor"
    protocol = mqtt.MQTTv5 if m.protocol == 5 else mqtt.MQTTv311
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol)
    if m.username is not None:
        client.username_pw_set(m.username, m.password)
    if m.tls:
        client.tls_set_context(_tls_context(cfg))
    connected, published = threading.Event(), threading.Event()
    result: dict[str, Any] = {}

    def on_connect(_c: Any, _u: Any, _f: Any, reason_code: Any, _p: Any) -> None:
        result["connack"] = reason_code
        connected.set()

    def on_publish(_c: Any, _u: Any, mid: int, reason_code: Any, _p: Any) -> None:
        result["puback"] = reason_code
        published.set()

    client.on_connect = on_connect
    client.on_publish = on_publish
    who = f"as {m.username!r}" if m.username else "without credentials"
    try:
        client.connect(host, port, keepalive=30)
    except (OSError, ssl.SSLError) as exc:
        yield fail("broker login", f"MQTT connect failed: {_reason(exc)}", "see the lines above")
        return
    client.loop_start()
    try:
        if not connected.wait(NET_TIMEOUT_S * 2):
            yield fail("broker login", "no CONNACK within 10 s", "is it an MQTT broker on that port?")
            return
        code = result["connack"]
        if code.is_failure:
            yield fail("broker login", f"refused {who}: {code}",
                       "mqtt.credentials_file must hold this building's user and password (docs/mqtt.md)")
            return
        yield ok("broker login", f"accepted {who} (client id {client_id})")
        topic = Topics(m.topic_prefix, cfg.community, cfg.building).status
        payload = json.dumps({"doctor": True, "gateway": cfg.gateway_id, "wall": time.time()})
        info = client.publish(topic, payload, qos=1, retain=False)
        if not published.wait(NET_TIMEOUT_S * 2):
            yield fail("broker acl", f"no PUBACK for a QoS 1 publish to {topic} within 10 s",
                       "the broker's ACL must let this user write its own subtree (docs/mqtt.md)")
            return
        code = result["puback"]
        if code.is_failure:
            yield fail("broker acl", f"publish to {topic} refused: {code}",
                       "the broker's ACL must let this user write its own subtree (docs/mqtt.md)")
        elif m.protocol != 5:
            yield warn("broker acl", f"publish to {topic} acknowledged (mid {info.mid}), but MQTT 3.1.1 "
                       "acknowledges even what the ACL drops", "use mqtt.protocol = 5 to see refusals")
        else:
            yield ok("broker acl", f"publish to {topic} acknowledged: {code}")
    finally:
        client.disconnect()
        client.loop_stop()


def check_clock(read_state: Callable[[], int | None] = adjtimex_state, *, development: bool = False) -> Check:
    """The kernel's own view (adjtimex), whichever NTP client disciplines it (timesyncd, chrony, ntpd). On a
    development site (mock pins) an unsynchronised clock is a warning: no event leaves it for a real building."""
    state = read_state()
    if state is None:
        flag = os.path.exists(TIMESYNC_FLAG)
        if flag:
            return ok("clock", "synchronised (systemd-timesyncd's flag; adjtimex not allowed here)")
        return warn("clock", "unknown: adjtimex not allowed and no systemd-timesyncd flag",
                    "timedatectl status shows whether NTP has synchronised")
    if state == TIME_ERROR and development:
        return warn("clock", "not synchronised (the kernel reports TIME_ERROR); a development site (mock pins), so "
                    "not a failure", "on a gateway: timedatectl set-ntp true; timedatectl timesync-status")
    if state == TIME_ERROR:
        return fail("clock", "not synchronised (the kernel reports TIME_ERROR): event times may be wrong",
                    "let NTP reach a server: timedatectl set-ntp true; timedatectl timesync-status")
    return ok("clock", "synchronised (adjtimex)")


def _service_environment(unit: str) -> str:
    """The unit's ``Environment=`` as systemd holds it ("" where there is no systemd to ask)."""
    if shutil.which("systemctl") is None:
        return ""
    try:
        return subprocess.run(["systemctl", "show", unit, "--property=Environment", "--value"],
                              capture_output=True, text=True, timeout=15, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ""


def check_test_override(environ: Mapping[str, str] = os.environ, *, service_environment: str | None = None,
                        unit: str = UNIT) -> Check:
    """The test-only clock override (:data:`gateway.clock.ASSUME_ENV`) set here or in the service: the gateway
    ignores it outside the test suite, but it has no place on a gateway."""
    in_unit = f"{ASSUME_ENV}=" in (_service_environment(unit) if service_environment is None
                                   else service_environment)
    if in_unit:
        return fail("test override", f"{ASSUME_ENV} is set in {unit} (a test-only variable; the gateway ignores it)",
                    f"remove it from the unit's Environment= (systemctl edit {unit}) and restart")
    if ASSUME_ENV in environ:
        return warn("test override", f"{ASSUME_ENV} is set in this shell (a test-only variable; a gateway started "
                    "from here ignores it)", f"unset {ASSUME_ENV}")
    return ok("test override", "no test-only variable set")


def check_storage(cfg: SiteConfig) -> Iterator[Check]:
    """Free space where the database lives, and SQLite's ``integrity_check`` on a read-only open."""
    s = cfg.storage
    db = Path(s.path)
    directory = next((p for p in (db.parent, *db.parent.parents) if p.exists()), Path("/"))
    free_mb = shutil.disk_usage(directory).free / 1e6
    need_mb = s.min_free_mb + s.max_mb
    if free_mb < s.min_free_mb:
        yield fail("disk", f"{free_mb:.0f} MB free at {directory}, below storage.min_free_mb = {s.min_free_mb:g}",
                   "free space on the SD card (journalctl --vacuum-size=50M, apt clean)")
    elif free_mb < need_mb:
        yield warn("disk", f"{free_mb:.0f} MB free at {directory}: less than min_free_mb + max_mb = {need_mb:g}",
                   "free space or lower storage.max_mb")
    else:
        yield ok("disk", f"{free_mb:.0f} MB free at {directory}")
    if not db.exists():
        yield warn("database", f"{db} does not exist yet", "it is made at the first start (systemctl start gatewayd)")
        return
    try:
        conn = sqlite3.connect(f"file:{db.resolve()}?mode=ro", uri=True, timeout=5.0)
        try:
            rows = [row[0] for row in conn.execute("PRAGMA integrity_check")]
        finally:
            conn.close()
    except sqlite3.Error as exc:
        yield fail("database", f"{db}: {exc}", "stop the daemon, move the file aside and start again "
                   "(docs/storage.md); keep the file for the event history")
        return
    if rows != ["ok"]:
        yield fail("database", f"{db}: integrity_check: {'; '.join(rows[:3])}",
                   "stop the daemon, move the file aside and start again (docs/storage.md)")
        return
    yield ok("database", f"{db}: integrity_check ok")


def check_service(unit: str = UNIT) -> Check:
    """systemd's view: the unit is active and its watchdog armed."""
    name = "service"
    if shutil.which("systemctl") is None:
        return warn(name, "no systemctl here: the service is not checked", "install with scripts/install.sh on the Pi")
    props = ("LoadState", "ActiveState", "SubState", "WatchdogUSec", "NRestarts", "MainPID", "Result",
             "ExecMainStatus", "StatusText")
    try:
        out = subprocess.run(["systemctl", "show", unit, *(f"--property={p}" for p in props)],
                             capture_output=True, text=True, timeout=15, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return warn(name, f"systemctl show failed: {_reason(exc)}", "run on the installed Pi")
    values = dict(line.split("=", 1) for line in out.stdout.splitlines() if "=" in line)
    if out.returncode != 0 or "ActiveState" not in values:
        return warn(name, f"systemd does not answer: {' '.join(out.stderr.split()) or out.returncode}",
                    "run on the installed Pi (systemd as init)")
    if values.get("LoadState") != "loaded":
        return fail(name, f"{unit} is {values.get('LoadState')}", "install it: sudo scripts/install.sh")
    state = f"{values['ActiveState']} ({values.get('SubState')})"
    why = values.get("StatusText") or "journalctl -u gatewayd -b -o cat says why"
    exit_status = values.get("ExecMainStatus", "?")
    again = f"sudo systemctl reset-failed {unit} && sudo systemctl restart {unit}"
    if values["ActiveState"] == "failed":
        return fail(name, f"{unit} has failed ({values.get('Result')}, exit status {exit_status}): {why}",
                    f"fix what it names (gatewayctl doctor, the lines above), then: {again}")
    if values.get("SubState") == "auto-restart" or (values["ActiveState"] == "activating"
                                                    and int(values.get("NRestarts") or 0) > 0):
        return fail(name, f"{unit} is in a crash loop: {values.get('NRestarts')} restarts, last exit status "
                    f"{exit_status}: {why}", f"fix what it names (gatewayctl doctor, the lines above), then: {again}")
    if values["ActiveState"] != "active":
        return warn(name, f"{unit} is {state}", f"once the checks above are ok: sudo systemctl start {unit}")
    watchdog = values.get("WatchdogUSec", "0")
    if watchdog in ("0", "infinity", ""):
        return fail(name, f"{unit} is {state} but its watchdog is not armed (WatchdogUSec={watchdog})",
                    "reinstall the unit from systemd/gatewayd.service (WatchdogSec=20s)")
    return ok(name, f"{unit} is {state}, watchdog {watchdog}, restarts {values.get('NRestarts', '?')}")


def check_group(cfg: SiteConfig) -> Check:
    """The caller may use the control socket: root, or a member of the group that owns it."""
    path = Path(cfg.control.socket)
    target = path if path.exists() else path.parent
    if not target.exists():
        group_name = cfg.control.group or "gateway"
        try:
            gid = grp.getgrnam(group_name).gr_gid
        except KeyError:
            return warn("socket group", f"{path} is not there and group {group_name} does not exist",
                        "install with scripts/install.sh (it creates group gateway)")
    else:
        gid = target.stat().st_gid
        try:
            group_name = grp.getgrgid(gid).gr_name
        except KeyError:
            group_name = str(gid)
    if os.geteuid() == 0 or gid == os.getegid() or gid in os.getgroups():
        return ok("socket group", f"{'root' if os.geteuid() == 0 else 'member of ' + group_name}: may use {path}")
    return fail("socket group", f"not in group {group_name}, which owns {target}",
                f"sudo usermod -aG {group_name} $USER, then log in again")


# ------------------------------------------------------------------------------------------- run


# ------------------------------------------------------------------------------------------- the SMS path


def port_holders(port: str, proc: str = "/proc") -> list[tuple[int, str]]:
    """Processes that have ``port`` open: (pid, name)."""
    real = os.path.realpath(port)
    holders = []
    for entry in os.listdir(proc):
        if not entry.isdigit():
            continue
        try:
            for fd in os.listdir(f"{proc}/{entry}/fd"):
                if os.path.realpath(f"{proc}/{entry}/fd/{fd}") == real:
                    name = Path(f"{proc}/{entry}/comm").read_text().strip()
                    holders.append((int(entry), name))
                    break
        except OSError:
            continue
    return holders


def _mm_ignored(port: str) -> bool | None:
    """Whether udev marked the port ID_MM_PORT_IGNORE (None: udevadm unavailable)."""
    if shutil.which("udevadm") is None:
        return None
    try:
        out = subprocess.run(["udevadm", "info", "-q", "property", "-n", port], capture_output=True, text=True,
                             timeout=5, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return "ID_MM_PORT_IGNORE=1" in out.splitlines()


def check_sms(cfg: SiteConfig, daemon: Daemon) -> Iterator[Check]:
    """The contacts file, the modem port (and whether ModemManager holds it), the modem's SIM, registration,
    signal and operator — from the running daemon, or asked directly when it is stopped."""
    from gateway.sms.contacts import Contacts, ContactsError
    from gateway.sms.modem import Modem

    sms = cfg.sms
    assert sms is not None
    try:
        counts = Contacts.load(sms.contacts, cfg.community, cfg.building).counts()
    except ContactsError as exc:
        yield fail("sms contacts", str(exc), "install the file the central server made for this building, "
                   "owned by the service, chmod 600 (docs/config.md, \"The contacts file\")")
    else:
        people = ", ".join(f"{n} {role.replace('_', ' ')}" for role, n in counts.items() if n)
        if counts["relatives"] + counts["unit_heads"] == 0:
            yield warn("sms contacts", f"{sms.contacts}: {people or 'nobody'}", "no alarm can be sent by SMS: "
                       "the file names no relatives or unit heads of this building")
        else:
            yield ok("sms contacts", f"{sms.contacts}: {people}")
    name = "sms modem"
    if not os.path.exists(sms.device):
        yield fail(name, f"{sms.device}: no such device", "plug in the modem; install systemd/99-gateway-modem.rules "
                   "for its stable name (docs/deploy.md, \"The modem\")")
        return
    holders = [(pid, comm) for pid, comm in port_holders(sms.device) if comm.lower().startswith("modemmanager")]
    if holders:
        yield fail(name, f"{sms.device}: ModemManager (pid {holders[0][0]}) holds the port",
                   "install systemd/99-gateway-modem.rules (ID_MM_PORT_IGNORE), udevadm trigger, and restart "
                   "ModemManager — or disable it: systemctl disable --now ModemManager")
        return
    installed = shutil.which("ModemManager") or os.path.exists("/usr/sbin/ModemManager")
    if installed and _mm_ignored(sms.device) is False:
        yield warn(name, f"{sms.device}: ModemManager is installed and not told to leave this port alone",
                   "install systemd/99-gateway-modem.rules (ID_MM_PORT_IGNORE) and udevadm trigger")
    if daemon.running:
        reply = daemon.request("status", {})
        sms_status = reply.get("data", {}).get("sms") or {}
        modem = sms_status.get("modem")
        if not modem:
            yield fail(name, f"{sms.device}: the daemon's SMS process has not checked the modem "
                       f"({sms_status.get('reason') or sms_status.get('process', 'unknown')})",
                       "journalctl -u gatewayd | grep sms")
            return
        where = "asked the running daemon"
    else:
        modem_obj = Modem(sms.device, connection=sms.connection, pin=sms.pin, smsc=sms.smsc)
        try:
            modem = modem_obj.check().as_dict()
        finally:
            modem_obj.close()
        where = "asked the modem directly"
    about = (f"{modem.get('manufacturer') or '?'} {modem.get('model') or ''}".strip()
             + f", SIM {modem.get('sim') or '?'}, operator {modem.get('operator') or 'none'}, signal "
             + (f"{modem['signal_percent']} %" if modem.get("signal_percent") is not None else "none"))
    if modem.get("problem"):
        yield fail(name, f"{sms.device} ({where}): {modem['problem']}; {about}", _MODEM_FIX.get(
            str(modem["problem"]).split(" (")[0].split(":")[0], "check the modem, its SIM and its antenna"))
    else:
        yield ok(name, f"{sms.device} ({where}): {about}")


_MODEM_FIX = {
    "SIM missing": "insert the SIM (power the modem off first)",
    "SIM locked": "set [sms] pin to the SIM's PIN, or remove the PIN from the SIM in a phone",
    "not registered": "check the antenna, the SIM's subscription and coverage",
    "no signal": "check the antenna and its cable; move it away from the metal cabinet",
    "port lost": "check the modem's USB cable and power",
    "modem not answering": "power-cycle the modem; check that nothing else (ModemManager) uses the port",
}


def run_doctor(config_path: str, *, connect: Callable[[str], Any] | None = None, unit: str = UNIT,
               example: Path | None = INSTALLED_EXAMPLE) -> list[Check]:
    """Every check for the site file at ``config_path`` as it is on disk, in the order a technician fixes them;
    ``connect`` opens the control socket (gatewayctl passes its ``ControlClient``)."""
    first, cfg = check_config(config_path, example)
    checks = [check_platform(), first]
    if cfg is None:
        return checks
    daemon = Daemon(cfg.control.socket, connect)
    try:
        steps: list[Callable[[], Iterator[Check] | Check]] = [
            lambda: check_gpio(cfg, daemon),
            *[(lambda bus=bus: check_serial(cfg, bus, daemon)) for bus in cfg.buses],
            lambda: check_device_filter(cfg, daemon, unit),
            lambda: check_broker(cfg),
            lambda: check_clock(development=cfg.runtime.pin_factory == "mock"),
            lambda: check_test_override(unit=unit),
            lambda: check_storage(cfg),
            lambda: check_service(unit),
            lambda: check_group(cfg),
            *([lambda: check_sms(cfg, daemon)] if cfg.sms is not None else []),
        ]
        for step in steps:
            try:
                produced = step()
            except Exception as exc:  # a check that breaks is a failed check, never a traceback
                checks.append(fail("doctor", f"a check crashed: {type(exc).__name__}: {_reason(exc)}",
                                   "report this with the output of gatewayctl doctor --json"))
                continue
            checks.extend([produced] if isinstance(produced, Check) else list(produced))
    finally:
        daemon.close()
    return checks
