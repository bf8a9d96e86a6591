"""The install rehearsed under a real systemd: scripts/install.sh in a booted Debian Bookworm.

A Bookworm root made by debootstrap (minbase, with systemd, dbus and python3-venv) is cached outside the
checkout, in /var/cache/gateway-rehearsal (``GATEWAY_REHEARSAL_CACHE``), and reused; each run writes into an
overlay of it, so the cached root stays as debootstrap left it. systemd boots as PID 1 in private PID, mount,
UTS and IPC namespaces (``unshare``, then ``pivot_root``) and the test reaches it with ``nsenter``. The real
installer runs inside against a copy of the committed checkout, offline, with the wheels fetched outside
(``install.sh --wheels``, from scripts/wheelhouse). Everything is judged by systemd's own view
(``systemctl show``, ``systemctl status``, ``journalctl``, ``systemd-analyze``), never by the daemon's internals.

What stands in for the hardware, and why:

- **GPIO chip**: there is no /dev/gpiochip* on a build machine. The site asks for lgpio first, and the unit
  must end in ``failed`` with ``gpio: cannot open /dev/gpiochip0`` as its status; then a drop-in sets
  ``GPIOZERO_PIN_FACTORY=mock`` (gpiozero's MockFactory) in place of a chip that came back.
- **RS-485 adapter**: a pseudo-terminal pair with pymodbus's own server behind it (gateway_sim/,
  run as a transient unit inside the booted system). A pty is not a ``ttyUSB``/``ttyAMA`` node, so the same
  drop-in adds ``DeviceAllow=char-pts rw`` to the unit's closed device policy; nothing else of the unit changes.
- **A hung bus**: the daemon's own fault injection (``GATEWAY_FAILPOINTS=bus_hang=bus1@/run/rehearsal/hang``),
  armed by creating that file, as tests/test_daemon_service.py does without systemd.

Slow (a cold run builds the root, about a minute here; see the report printed at the end) and root only.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.broker import free_port
from tests.support.site import build_site

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("GATEWAY_REHEARSAL_CACHE", "/var/cache/gateway-rehearsal"))
ROOTFS = CACHE / "bookworm"
#: The environment of every command run in the booted root: its own, as a technician's shell there would
#: have, never this process's. An ``LG_WD`` that an earlier test of the same worker set (``load_lgpio``) names
#: a directory that does not exist in there, and lgpio then failed to load (BAD_PATHNAME, ``.lgd-nfy-3``).
CONTAINER_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root",
                 "LANG": "C.UTF-8"}
DEBOOTSTRAP = ["debootstrap", "--variant=minbase",
               "--include=systemd,systemd-sysv,dbus,python3,python3-venv,jq,sudo", "bookworm"]
MAX_EXPOSURE = 2.0

BOOT = r"""
set -euo pipefail
lower=$1 upper=$2 work=$3 root=$4
mount --make-rprivate /
mount -t overlay overlay -o "lowerdir=$lower,upperdir=$upper,workdir=$work" "$root"
mount --bind "$root" "$root"
mount --rbind /dev "$root/dev"
mount -t proc proc "$root/proc"
mount --rbind /sys "$root/sys"
cd "$root"
mkdir -p .oldroot
pivot_root . .oldroot
umount -l /.oldroot
rmdir /.oldroot
exec /usr/bin/env -i container=gateway-rehearsal /lib/systemd/systemd --system
"""

SIMULATED_BUS = """
import os, signal
from gateway_sim.bus import SimulatedBus
from gateway_sim.nullmodem import VirtualNullModem

os.makedirs("/run/rehearsal", exist_ok=True)
with VirtualNullModem("/run/rehearsal") as modem:
    os.chmod(os.path.realpath(modem.gateway_port), 0o666)  # the daemon runs as user gateway
    bus = SimulatedBus(modem.device_port)
    bus.add_gas_detector(1, "A", unit="%LEL", decimals=1).set_status("normal")
    with bus:
        open("/run/rehearsal/ready", "w").close()
        signal.pause()
"""

DROP_IN = """[Service]
# Stand-ins for the hardware in the install rehearsal (tests/test_install_rehearsal.py).
Environment=GATEWAY_FAILPOINTS=bus_hang=bus1@/run/rehearsal/hang
DeviceAllow=char-pts rw
"""
#: The GPIO chip that "came back": mock pins from here on.
MOCK_PINS = """[Service]
Environment=GPIOZERO_PIN_FACTORY=mock
"""
#: What the site adds for the roles: readers in group gateway, actors in gateway-ops.
CONTROL_ROLES = 'socket = "/run/gateway/control.sock"\ngroup = "gateway"\noperator_group = "gateway-ops"'
#: The log recipe of docs/deploy.md ("Logs and status"), which must survive the lines that are not JSON.
JQ_RECIPE = "journalctl -u gatewayd -o cat --no-pager | jq -R -c 'fromjson? // empty | select(.level != \"info\")'"
#: The recipe as it was, which stopped at the first line that is not JSON.
JQ_OLD = "journalctl -u gatewayd -o cat --no-pager | jq -c 'select(.level != \"info\")'"

# Paths a booted system changes by itself (and the backups useradd makes for the technicians of step 7);
# anything else new after --uninstall --purge is left behind.
SYSTEM_CHURN = ("/var/log/", "/var/lib/systemd/", "/var/lib/dbus/", "/var/cache/", "/var/tmp/", "/tmp/", "/root/",
                "/etc/machine-id", "/etc/.pwd.lock", "/etc/subuid-", "/etc/subgid-", "/etc/mtab", "/var/lib/private/",
                "/run/", "/dev/", "/proc/", "/sys/")


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root (debootstrap, namespaces, mounts)"
    missing = [tool for tool in ("unshare", "nsenter", "mount", "git") if shutil.which(tool) is None]
    if missing:
        return f"missing {', '.join(missing)}"
    return None


def ensure_debootstrap() -> None:
    if shutil.which("debootstrap") is None:
        subprocess.run(["apt-get", "install", "-y", "debootstrap"], capture_output=True, timeout=600, check=False)
    if shutil.which("debootstrap") is None:
        pytest.skip("debootstrap is not installed and apt-get could not install it")


def cached_root(name: str = "bookworm", command: list[str] = DEBOOTSTRAP) -> tuple[Path, bool]:
    """The root ``CACHE/name`` that ``command`` (debootstrap, less its target) makes, made once (under a lock, so
    parallel runs wait for one debootstrap) and made again when the command changed; ``cold`` tells whether this
    call made it."""
    CACHE.mkdir(parents=True, exist_ok=True)
    rootfs, done = CACHE / name, CACHE / f"{name}.done"
    recipe = " ".join(command) + "\n"
    with open(CACHE / f".lock-{name}", "w") as lock:  # one per root: a cold one does not hold up the others
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (rootfs / "usr/bin/python3").exists() and done.exists() and done.read_text() == recipe:
            return rootfs, False
        ensure_debootstrap()
        partial = CACHE / f"{name}.partial-{os.getpid()}"
        shutil.rmtree(partial, ignore_errors=True)
        shutil.rmtree(rootfs, ignore_errors=True)
        result = subprocess.run([*command, str(partial)], capture_output=True, text=True, timeout=2400,
                                check=False)
        if result.returncode != 0:
            shutil.rmtree(partial, ignore_errors=True)
            pytest.fail(f"debootstrap failed: {result.stdout[-1500:]} {result.stderr[-1500:]}")
        partial.rename(rootfs)
        done.write_text(recipe)
        return rootfs, True


def wheelhouse(into: Path, *target: str) -> None:
    """The wheels a building's install needs, for ``target`` (scripts/wheelhouse's options; none: this
    machine), fetched on the host: the root has no index to reach. Kept in the cache by the lock and the script
    they were fetched with, so a warm run fetches nothing."""
    recipe = (ROOT / "constraints/runtime.txt").read_bytes() + (ROOT / "scripts/wheelhouse").read_bytes()
    key = hashlib.sha256(recipe + " ".join([sys.version, *target]).encode()).hexdigest()[:16]
    kept = CACHE / f"wheels-{key}"
    if not kept.is_dir():
        partial = CACHE / f"wheels-{key}.partial-{os.getpid()}"
        shutil.rmtree(partial, ignore_errors=True)
        result = subprocess.run(["bash", str(ROOT / "scripts/wheelhouse"), str(partial), *target],
                                capture_output=True, text=True, timeout=900, check=False,
                                env={**os.environ, "PYTHON": sys.executable})
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
        with contextlib.suppress(OSError):  # another run made it meanwhile
            partial.rename(kept)
        shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(kept, into)


def locked_pins(machine: str | None = None) -> dict[str, str]:
    """constraints/runtime.txt as name → version (canonical names): the pins whose marker holds on ``machine``
    (by default this one; a package may be pinned per machine, python-gammu is)."""
    from packaging.markers import Marker
    from packaging.utils import canonicalize_name

    found = {}
    for line in (ROOT / "constraints/runtime.txt").read_text().splitlines():
        if "==" not in line or line.startswith("#"):
            continue
        pin, _, marker = line.partition(";")
        if marker.strip() and not Marker(marker.strip()).evaluate(
                {"platform_machine": machine or platform.machine()}):
            continue
        name, version = pin.strip().split("==")
        found[canonicalize_name(name)] = version
    return found


def installed(run: Callable[..., subprocess.CompletedProcess[str]], python: str) -> dict[str, str]:
    """What ``python``'s environment has installed, name → version (canonical names)."""
    from packaging.utils import canonicalize_name

    out = run(python, "-c", "import importlib.metadata as m; "
              "print('\\n'.join(d.metadata['Name'] + '==' + d.version for d in m.distributions()))").stdout
    pairs = (line.split("==") for line in out.splitlines() if "==" in line)
    return {canonicalize_name(name): version for name, version in pairs}


class Booted:
    """systemd as PID 1 of a private PID namespace, on an overlay of ``lower``."""

    def __init__(self, lower: Path, work: Path) -> None:
        self.lower = lower
        self.upper, self.workdir, self.mountpoint = work / "upper", work / "work", work / "root"
        for d in (self.upper, self.workdir, self.mountpoint):
            d.mkdir(parents=True)
        self.unshare: subprocess.Popen[bytes] | None = None
        self.pid = 0

    def boot(self, timeout: float = 120.0) -> None:
        self.unshare = subprocess.Popen(
            ["unshare", "--fork", "--pid", "--mount", "--uts", "--ipc", "bash", "-c", BOOT, "boot",
             str(self.lower), str(self.upper), str(self.workdir), str(self.mountpoint)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        children = Path(f"/proc/{self.unshare.pid}/task/{self.unshare.pid}/children")
        state = wait_until(lambda: self._systemd_pid(children), timeout, "systemd never started")
        self.pid = state
        wait_until(lambda: self.run("systemctl", "is-system-running", check=False).stdout.strip()
                   in ("running", "degraded"), timeout, "the system never finished booting")

    def _systemd_pid(self, children: Path) -> int:
        assert self.unshare is not None
        if self.unshare.poll() is not None:
            stderr = self.unshare.stderr.read().decode() if self.unshare.stderr else ""
            raise AssertionError(f"the boot failed: {stderr}")
        with contextlib.suppress(OSError, ValueError, IndexError):
            pid = int(children.read_text().split()[0])
            if Path(f"/proc/{pid}/comm").read_text().strip() == "systemd":
                return pid
        return 0

    def run(self, *args: str, check: bool = True, input: str | None = None, timeout: float = 600.0,
            ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(["nsenter", "-t", str(self.pid), "-m", "-p", "-u", "-i", "-r", "-w", "--", *args],
                                capture_output=True, text=True, input=input, timeout=timeout, check=False,
                                env=CONTAINER_ENV)
        if check:
            assert result.returncode == 0, (args, result.stdout[-3000:], result.stderr[-3000:])
        return result

    def write(self, path: str, text: str, mode: str = "0644", owner: str = "root:root") -> None:
        self.run("sh", "-c", f'mkdir -p "$(dirname "$1")" && cat > "$1" && chmod {mode} "$1" && chown {owner} "$1"',
                 "write", path, input=text)

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.run("systemctl", "show", unit, *(f"--property={p}" for p in props)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def shutdown(self) -> None:
        if self.unshare is None:
            return
        children = Path(f"/proc/{self.unshare.pid}/task/{self.unshare.pid}/children")
        with contextlib.suppress(OSError, ValueError, IndexError):
            self.pid = self.pid or int(children.read_text().split()[0])
        if self.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, 9)  # PID 1 of the namespace: every process in it goes with it
        else:
            self.unshare.kill()
        self.unshare.wait(60)


#: Serial nodes made after the unit started, by class: (name, major, minor). 189 (USB devices) is no serial port
#: and stays out of the unit's list: it shows the filter is on.
LATE_NODES = (("ttyS", 4, 77), ("ttyAMA", 204, 73), ("ttyUSB", 188, 9), ("ttyACM", 166, 9), ("usbdev", 189, 9))

DEVICE_PROBE = r"""
set -eu
cgroup=$(find /sys/fs/cgroup/devices /sys/fs/cgroup -maxdepth 8 -type d -name gatewayd.service 2>/dev/null | head -n 1)
[ -n "$cgroup" ] || { echo "no cgroup for gatewayd.service" >&2; exit 2; }
mkdir -p /root/late
while [ $# -gt 0 ]; do
    [ -e "/root/late/$1" ] || mknod "/root/late/$1" c "$2" "$3"  # named by class alone
    shift 3
done
echo $$ > "$cgroup/cgroup.procs"
exec python3 -c '
import errno, os
for name in sorted(os.listdir("/root/late")):
    try:
        os.close(os.open("/root/late/" + name, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK))
        print(name, "opened")
    except OSError as exc:
        print(name, errno.errorcode[exc.errno])
'
"""


def device_probe(booted: Booted) -> dict[str, str]:
    """How opening each of ``LATE_NODES``, made after the unit started, ends for a process in the unit's cgroup
    (and so under its device filter): ``opened`` or the errno's name. The filter refuses with EPERM; a node it
    lets through whose driver is not there ends in ENXIO or ENODEV, the kernel's own answer."""
    nodes = [str(part) for node in LATE_NODES for part in node]
    out = booted.run("sh", "-c", DEVICE_PROBE, "probe", *nodes).stdout
    return dict(line.split(" ", 1) for line in out.splitlines())


def wait_until(condition: Callable[[], object], timeout: float, message: str) -> object:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, message
        time.sleep(0.2)


def checkout_copy(into: Path) -> None:
    """The committed checkout (what CI tests), as ``git archive HEAD`` gives it."""
    into.mkdir(parents=True)
    archive = into.parent / "checkout.tar"
    subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", "-o", str(archive), "HEAD"], check=True,
                   timeout=120)
    with tarfile.open(archive) as tar:
        tar.extractall(into, filter="tar")
    archive.unlink()


def files_of(booted: Booted) -> set[str]:
    out = booted.run("find", "/", "-xdev", "-path", "/proc", "-prune", "-o", "-print", timeout=300).stdout
    return set(out.splitlines())


@pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or "")
def test_install_rehearsal(tmp_path: Path) -> None:
    timings: dict[str, float] = {}
    started = time.monotonic()

    def lap(name: str) -> None:
        timings[name] = round(time.monotonic() - started - sum(timings.values()), 1)

    lower, cold = cached_root()
    lap("debootstrap (cold)" if cold else "cached root")

    # the checkout and its wheels, into the overlay's upper layer before it is mounted
    booted = Booted(lower, tmp_path)
    checkout_copy(booted.upper / "root/gateway")
    wheels = booted.upper / "root/wheels"
    wheelhouse(wheels)
    assert any(p.name.startswith("lgpio-") and p.name.endswith(".whl") for p in wheels.iterdir())
    (booted.upper / "root/simbus.py").write_text(SIMULATED_BUS)
    lap("checkout and wheels")

    try:
        booted.boot()
        lap("boot")
        before = files_of(booted)
        install = ["bash", "/root/gateway/scripts/install.sh", "--wheels", "/root/wheels"]

        # 1. with no network and no wheelhouse: one line, within seconds, and nothing changed
        offline = booted.run("unshare", "--net", "bash", "/root/gateway/scripts/install.sh", check=False,
                             timeout=120)
        assert offline.returncode == 1, offline.stdout[-2000:]
        assert offline.stderr.startswith("install.sh: no network: cannot reach https://pypi.org/simple/ ("), \
            offline.stderr
        assert len(offline.stderr.splitlines()) == 1, offline.stderr
        assert "nothing was changed. Install offline instead: sudo scripts/install.sh --wheels DIR" in offline.stderr
        assert "+ " not in offline.stdout
        assert booted.run("getent", "passwd", "gateway", check=False).returncode != 0
        assert booted.run("test", "-e", "/opt/gateway", check=False).returncode != 0

        # 2. the installer, offline from the wheelhouse: enabled, not started on the shipped example, commands on
        #    PATH, every runtime dependency at its locked version
        first = booted.run(*install)
        lap("install")
        assert "keep: gatewayd.service not started: /etc/gateway/building.toml is the shipped example, unchanged" \
            in first.stdout, first.stdout[-3000:]
        assert "lgpio: wheel (x86_64, Python 3.11." in first.stdout
        assert "next: run: gatewayctl doctor" in first.stdout
        assert booted.run("systemctl", "is-enabled", "gatewayd").stdout.strip() == "enabled"
        assert booted.show("gatewayd", "ActiveState")["ActiveState"] == "inactive"
        assert booted.run("gatewayctl", "--version").stdout.startswith("gatewayctl ")
        booted.run("/opt/gateway/venv/bin/python", "-c", "from drivers.gpio import load_lgpio; load_lgpio()")
        have = installed(booted.run, "/opt/gateway/venv/bin/python")
        assert {name: have.get(name) for name in locked_pins()} == locked_pins()
        assert booted.run("/opt/gateway/venv/bin/python", "-c", "import fleet", check=False).returncode != 0

        # 3. the unedited example, started anyway: "failed" at once (no restart), the reason in `systemctl status`,
        #    and the doctor says FAIL with a fix
        booted.run("systemctl", "start", "gatewayd", check=False, timeout=120)
        wait_until(lambda: booted.show("gatewayd", "ActiveState")["ActiveState"] == "failed", 60,
                   "the unedited example did not end in failed")
        state = booted.show("gatewayd", "NRestarts", "ExecMainStatus", "StatusText")
        assert (state["NRestarts"], state["ExecMainStatus"]) == ("0", "78"), state
        assert "is still the shipped example, unchanged" in state["StatusText"]
        status = booted.run("systemctl", "status", "--no-pager", "gatewayd", check=False).stdout
        assert "is still the shipped example, unchanged" in status, status
        doctor = json.loads(booted.run("gatewayctl", "doctor", "--json", check=False).stdout)
        checks = {c["name"]: c for c in doctor["data"]["checks"]}
        assert checks["config"]["status"] == "FAIL"
        assert "still the shipped example" in checks["config"]["detail"]
        assert "Debian GNU/Linux 12 (bookworm); x86_64; Python 3.11." in checks["platform"]["detail"]
        lap("unedited example")

        # 4. an edited site on a board without a GPIO chip: a crash loop that ends in "failed" within a minute,
        #    its reason in `systemctl status` meanwhile and after, and doctor FAIL with a fix that works as written
        booted.write("/etc/systemd/system/gatewayd.service.d/rehearsal.conf", DROP_IN)
        # the technicians of step 7, before the daemon reads its groups at start
        booted.run("groupadd", "--system", "gateway-ops")
        booted.run("useradd", "--no-create-home", "--groups", "gateway", "tech-reader")
        booted.run("useradd", "--no-create-home", "--groups", "gateway,gateway-ops", "tech-operator")
        # the install carries no simulator: the checkout's gateway_sim/, alone on the path beside the installed gateway
        booted.run("sh", "-c", "mkdir -p /root/sim && ln -sfn /root/gateway/gateway_sim /root/sim/gateway_sim")
        booted.run("systemd-run", "--unit=rehearsal-bus", "--working-directory=/root/gateway",
                   "--setenv=PYTHONPATH=/root/sim", "/opt/gateway/venv/bin/python", "/root/simbus.py")
        wait_until(lambda: booted.run("test", "-e", "/run/rehearsal/ready", check=False).returncode == 0, 60,
                   "the simulated bus never came up")
        site = build_site(bus_port="/run/rehearsal/ttyGW0", db_path="/var/lib/gateway/events.db",
                          broker_port=free_port(), socket_path="/run/gateway/control.sock", building="b42")
        booted.write("/etc/gateway/building.toml",
                     site.toml.replace('socket = "/run/gateway/control.sock"', CONTROL_ROLES),
                     mode="0640", owner="root:gateway")
        booted.run("systemctl", "daemon-reload")
        booted.run("systemctl", "reset-failed", "gatewayd")
        booted.run("systemctl", "start", "--no-block", "gatewayd")
        looping_samples: list[str] = []

        def failed_sampling() -> bool:
            shown = booted.show("gatewayd", "ActiveState", "SubState")
            if shown["SubState"] == "auto-restart":
                looping_samples.append(booted.run("systemctl", "status", "--no-pager", "gatewayd",
                                                  check=False).stdout)
            return shown["ActiveState"] == "failed"

        wait_until(failed_sampling, 60, "a missing GPIO chip did not end in failed within a minute")
        state = booted.show("gatewayd", "NRestarts", "ExecMainStatus", "StatusText", "Result")
        assert state["ExecMainStatus"] == "69", state
        reason = "gpio: cannot open /dev/gpiochip0 (lgpio)"
        assert reason in state["StatusText"], state
        assert reason in booted.run("systemctl", "status", "--no-pager", "gatewayd", check=False).stdout
        # judged by the state the sample itself shows: the next start may have begun since `systemctl show`
        waiting = [sample for sample in looping_samples if "activating (auto-restart)" in sample]
        assert waiting, looping_samples
        assert all(reason in sample for sample in waiting), waiting
        doctor = json.loads(booted.run("gatewayctl", "doctor", "--json", check=False).stdout)
        service = {c["name"]: c for c in doctor["data"]["checks"]}["service"]
        assert service["status"] == "FAIL", service
        assert reason in service["detail"]
        fix = service["fix"].split("then: ", 1)[1]
        assert fix == "sudo systemctl reset-failed gatewayd.service && sudo systemctl restart gatewayd.service"
        # the chip is back (mock pins stand in for it); the doctor's fix, run as it is written
        booted.write("/etc/systemd/system/gatewayd.service.d/mock-pins.conf", MOCK_PINS)
        booted.run("systemctl", "daemon-reload")
        booted.run("sh", "-c", fix, timeout=120)
        lap(f"crash loop to failed ({state['NRestarts']} restarts, {len(waiting)} samples while waiting)")

        # 5. it starts and sends READY: Type=notify is "active (running)" only after READY=1
        wait_until(lambda: booted.show("gatewayd", "SubState")["SubState"] == "running", 120,
                   "gatewayd never reported READY")
        state = booted.show("gatewayd", "ActiveState", "SubState", "StatusText", "WatchdogUSec", "NRestarts")
        assert state["ActiveState"] == "active"
        assert state["WatchdogUSec"] == "20s"
        assert state["StatusText"], "no STATUS= from the daemon"
        lap("start to READY")

        # 6. the sandbox as systemd scores it on the booted system
        report = booted.run("systemd-analyze", "security", "--no-pager", "gatewayd.service").stdout
        match = re.search(r"Overall exposure level for gatewayd\.service: (\d+(?:\.\d+)?)", report)
        assert match, report[-2000:]
        exposure = float(match.group(1))
        assert exposure <= MAX_EXPOSURE, report

        # 6b. journald records the daemon's structured fields: one field per key of each event (gateway/logs.py),
        #    queryable by field, with the JSON line as the message and the unit's own metadata
        def started_entries() -> list[dict[str, str]]:
            out = booted.run("journalctl", "-u", "gatewayd", "-o", "json", "--no-pager",
                             "GATEWAY_EVENT=panel started").stdout
            return [json.loads(line) for line in out.splitlines()]

        entry = wait_until(started_entries, 60, "no 'panel started' entry in the journal")[0]  # type: ignore[index]
        assert entry["_SYSTEMD_UNIT"] == "gatewayd.service"
        assert entry["SYSLOG_IDENTIFIER"] == "gatewayd"
        assert entry["PRIORITY"] == "6"
        assert entry["GATEWAY_GATEWAY"] == "test-community-b42"
        assert entry["GATEWAY_DEVICES"] == "1"
        assert json.loads(entry["MESSAGE"])["event"] == "panel started"

        # 6c. gatewayctl doctor beside the running daemon: systemd's view of the service, both ways
        doctor = json.loads(booted.run("gatewayctl", "doctor", "--json", check=False).stdout)
        checks = {c["name"]: c for c in doctor["data"]["checks"]}
        assert checks["service"]["status"] == "ok", checks["service"]
        assert "watchdog 20s" in checks["service"]["detail"]
        assert checks["serial bus1"]["status"] == "ok", checks["serial bus1"]
        assert "asked the running daemon" in checks["serial bus1"]["detail"]
        assert checks["socket group"]["status"] == "ok"
        missing = json.loads(booted.run("gatewayctl", "doctor", "--json", "--unit", "nosuch.service",
                                        check=False).stdout)
        assert {c["name"]: c["status"] for c in missing["data"]["checks"]}["service"] == "FAIL"
        lap("checks while running")

        # 7. the roles under the shipped unit: the socket carries [control] group; a member of it who is not an
        #    operator reads and is refused actions; an operator acts
        assert booted.run("stat", "-c", "%G %a", "/run/gateway/control.sock").stdout.split() == ["gateway", "660"]
        read = booted.run("runuser", "-u", "tech-reader", "--", "gatewayctl", "status", check=False)
        assert read.returncode == 0, read.stdout + read.stderr
        refused = booted.run("runuser", "-u", "tech-reader", "--", "gatewayctl", "buzzer-test", check=False)
        assert refused.returncode == 4, refused.stdout + refused.stderr
        assert "permission denied: it needs the operator role" in refused.stdout + refused.stderr
        acted = booted.run("runuser", "-u", "tech-operator", "--", "gatewayctl", "buzzer-test", check=False,
                           timeout=120)
        assert acted.returncode == 0, acted.stdout + acted.stderr
        journal = booted.run("journalctl", "-u", "gatewayd", "--no-pager", "-o", "cat").stdout
        assert "control socket group not set" not in journal
        lap("roles")

        # 8. serial ports created after the start. The unit grants ttyUSB, ttyACM and ttyAMA by major number, so a
        #    node of theirs passes the filter although their drivers were not loaded when it started (this kernel
        #    has no modules: they are not loaded at all, which the open then says with ENXIO, past the filter);
        #    ttySC, whose major is handed out when its driver loads, is granted by name, its driver loaded at boot
        #    (/etc/modules-load.d, ordered before the unit); a class outside the list is refused (EPERM)
        shown = booted.run("systemctl", "show", "-p", "DeviceAllow", "-p", "After", "gatewayd").stdout
        for entry in ("char-188 rw", "char-166 rw", "char-204 rw", "char-ttyS rw", "char-ttySC rw"):
            assert f"DeviceAllow={entry}\n" in shown, shown
        assert "systemd-modules-load.service" in shown.split("After=", 1)[1], shown
        modules = booted.run("cat", "/etc/modules-load.d/gateway-serial.conf").stdout.splitlines()
        assert [line for line in modules if line and not line.startswith("#")] == ["sc16is7xx"]
        registered = {line.split()[1] for line in Path("/proc/devices").read_text().splitlines()[1:]
                      if len(line.split()) == 2}
        errors = device_probe(booted)
        for name, _, _ in LATE_NODES[:-1]:
            assert errors[name] not in ("EPERM", "EACCES"), errors  # ENXIO/ENODEV/EIO: past the filter
        assert errors["usbdev"] == "EPERM", errors  # the filter is on: a class the unit does not list
        # doctor judges a site's port against the running unit's list: a ttyUSB node admitted by number, a class
        # outside the list FAIL with the drop-in that admits it
        for port, verdict in (("/root/late/ttyUSB", "ok"), ("/root/late/usbdev", "FAIL")):
            other = site.toml.replace('"/run/rehearsal/ttyGW0"', f'"{port}"')
            booted.write("/root/late.toml", other, mode="0640", owner="root:gateway")
            doctor = json.loads(booted.run("gatewayctl", "--config", "/root/late.toml", "doctor", "--json",
                                           check=False).stdout)
            check = {c["name"]: c for c in doctor["data"]["checks"]}["device filter bus bus1"]
            assert check["status"] == verdict, check
        assert "admitted by char-pts rw" in checks["device filter bus bus1"]["detail"], checks
        assert check["fix"].startswith("sudo systemctl edit gatewayd.service, add [Service] DeviceAllow=char-189 rw"), \
            check
        lap(f"device access ({', '.join(f'{k} {v}' for k, v in errors.items())}; drivers registered here: "
            f"{sorted(registered & {'ttyUSB', 'ttyACM', 'ttyAMA', 'ttySC'}) or 'none'})")

        # 9. the log recipes of docs/deploy.md survive the lines that are not JSON (the start failures above)
        old = booted.run("sh", "-c", JQ_OLD, check=False)
        assert old.returncode != 0, "the old recipe no longer meets a line that is not JSON: the test proves nothing"
        recipe = booted.run("sh", "-c", JQ_RECIPE)
        errors_logged = [json.loads(line) for line in recipe.stdout.splitlines()]
        assert any(e.get("event") == "the panel cannot start" for e in errors_logged), recipe.stdout[-2000:]

        # 10. a hung bus thread: the watchdog kills the daemon and systemd starts it again
        restarts = int(state["NRestarts"])
        booted.run("touch", "/run/rehearsal/hang")
        wait_until(lambda: int(booted.show("gatewayd", "NRestarts")["NRestarts"]) > restarts, 180,
                   "the watchdog never restarted the hung daemon")
        booted.run("rm", "-f", "/run/rehearsal/hang")
        journal = booted.run("journalctl", "-u", "gatewayd", "--no-pager", "-o", "cat").stdout
        assert "Watchdog timeout" in journal, journal[-3000:]
        wait_until(lambda: booted.show("gatewayd", "SubState")["SubState"] == "running", 120,
                   "gatewayd did not come back after the watchdog")
        lap("watchdog restart")

        # 11. a planned stop ends within TimeoutStopSec: systemd says success, not timeout
        booted.run("systemctl", "stop", "gatewayd", timeout=120)
        after_stop = booted.show("gatewayd", "ActiveState", "Result")
        assert after_stop == {"ActiveState": "inactive", "Result": "success"}, after_stop
        lap("stop")

        # 12. --uninstall --purge leaves nothing of the gateway behind
        booted.run("systemctl", "stop", "rehearsal-bus")
        booted.run("rm", "-f", "/etc/systemd/system/gatewayd.service.d/rehearsal.conf",
                   "/etc/systemd/system/gatewayd.service.d/mock-pins.conf")
        booted.run("userdel", "tech-reader")
        booted.run("userdel", "tech-operator")
        booted.run("groupdel", "gateway-ops")
        purge = booted.run("bash", "/root/gateway/scripts/install.sh", "--uninstall", "--purge")
        assert booted.show("gatewayd", "LoadState")["LoadState"] == "not-found", purge.stdout
        assert booted.run("getent", "passwd", "gateway", check=False).returncode != 0
        assert booted.run("getent", "group", "gateway", check=False).returncode != 0
        left = sorted(p for p in files_of(booted) - before if not p.startswith(SYSTEM_CHURN))
        assert not [p for p in left if "gateway" in p or p.startswith(("/opt", "/usr/local", "/etc"))], left
        lap("uninstall --purge")
    finally:
        booted.shutdown()

    print(f"\ninstall rehearsal ({'cold' if cold else 'cached root'}): {round(time.monotonic() - started, 1)} s; "
          f"exposure {exposure}; " + ", ".join(f"{k} {v} s" for k, v in timings.items()))


@pytest.fixture(autouse=True)
def _no_leftover_mounts(tmp_path: Path) -> Iterator[None]:
    """The overlay lives in the namespace that dies with its systemd: nothing stays mounted on the host (of this
    test's; a debootstrap running beside it mounts into its own partial root)."""
    yield
    assert str(tmp_path) not in Path("/proc/self/mountinfo").read_text()
