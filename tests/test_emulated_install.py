"""The install rehearsed on the Raspberry Pi OS releases buildings run, under qemu-user emulation.

One Debian root per target (Raspberry Pi's own archive is not reachable here; Debian of the same release and
architecture is the base of that Pi OS), made by debootstrap once and cached in /var/cache/gateway-rehearsal
like the Bookworm root of tests/test_install_rehearsal.py; each run writes into an overlay of it. Foreign code
runs through binfmt_misc and Debian's qemu-user-static.

systemd is not booted under emulation: tried here, the arm64 Trixie root's systemd boots as PID 1 under
qemu-user (to "degraded"), but every service it starts fails to spawn (``Result=resources``: journald, sysusers,
tmpfiles), so the gateway's unit could not run there either. The root is entered as a chroot in a private mount
namespace instead (docs/deploy.md, "Targets"), with ``SYSTEMD_OFFLINE=1`` so that systemctl does only what works
offline (``systemctl enable``); the unit itself is rehearsed under a real systemd in
tests/test_install_rehearsal.py. In each target:

- ``scripts/install.sh --wheels`` as a technician runs it, offline, from wheels fetched on the host for that
  platform (scripts/wheelhouse) and the distribution's own packages (the build tools where lgpio is built, and
  libgammu-dev with them where python-gammu is, on armhf); lgpio, msgspec and gammu import;
- every runtime dependency at the lock's version; ``gatewayctl config check`` passes on an edited site and
  ``gatewayctl doctor`` names the platform;
- ``gatewayd`` with ``pin_factory = "lgpio"`` exits 69 in one line: there is no gpiochip under emulation;
- ``gatewayd --demo`` refuses in one line (exit 78): the install carries no simulator; with the checkout's
  ``gateway_sim/`` alone on ``PYTHONPATH`` the demo runs (``python -m gateway_sim.demo --broker``, since
  ``gatewayd --demo`` would start a mosquitto of its own), and its high alarm reaches a mosquitto started by the
  test (host binary, in a network namespace of its own);
- the pure alarm core's tests and the panel-process tests pass inside the root.

Timing under emulation means nothing: nothing here asserts one. The wall time of each part and the PSS of the
demo's two processes (qemu included) are printed, for docs/deploy.md's table. Every target runs only with
``GATEWAY_REHEARSE_ALL=1`` (README): from a cold root the arm64 Trixie one took 27 minutes (2026-12-07)
(lgpio built from source under emulation), past CI's 25-minute budget for the whole suite; the tests inside
the root run in Trixie, and in Bookworm too with ``GATEWAY_REHEARSE_ALL=1``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.test_install_rehearsal import (
    CACHE,
    CONTAINER_ENV,
    cached_root,
    checkout_copy,
    installed,
    locked_pins,
    wait_until,
    wheelhouse,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(5400)]

ROOT = Path(__file__).resolve().parent.parent
#: The tests run inside each root, and the tools they need there (pure-Python wheels, any platform).
TESTS_INSIDE = ["tests/test_alarm.py", "tests/test_panel_process.py"]
TEST_TOOLS = ["pytest", "pytest-asyncio", "pytest-timeout", "hypothesis"]
#: Tests of those files that measure time or load on the wire or in the scheduler: meaningless under emulation. The
#: kill -9 test waits 60 s for a gatewayctl status, which timed out once under emulation on a busy machine.
UNTIMED = ("not realtime and not 150_events_a_second and not busy_fail_point"
           " and not kill_9_of_the_panel_keeps_the_latch")


@dataclass(frozen=True)
class Target:
    """One Pi OS release and architecture, as the Debian root that stands in for it."""

    name: str
    suite: str
    arch: str
    machine: str
    python: str
    glibc: str
    lgpio: str  # how install.sh gets lgpio there: "wheel" or "build"
    gammu: str  # and python-gammu: "wheel" (bundles libGammu) or "build" (against Debian's libgammu-dev)
    always: bool  # False: only with GATEWAY_REHEARSE_ALL=1 (every target today: see the module's docstring)
    #: whether the tests inside the root run without GATEWAY_REHEARSE_ALL=1 (about 11 minutes under emulation)
    tests_always: bool = False

    @property
    def debootstrap(self) -> list[str]:
        packages = ["systemd", "systemd-sysv", "dbus", "python3", "python3-venv", "mosquitto"]
        if self.lgpio == "build":
            packages += ["python3-dev", "gcc", "libc6-dev", "swig"]
        if self.gammu == "build":
            packages += ["libgammu-dev", "pkg-config", "gcc", "python3-dev"]
        packages = list(dict.fromkeys(packages))
        return ["debootstrap", f"--arch={self.arch}", "--variant=minbase", f"--include={','.join(packages)}",
                self.suite]


TARGETS = [
    Target("trixie-arm64", "trixie", "arm64", "aarch64", "3.13", "2.41", "build", "wheel", always=False,
           tests_always=True),
    Target("bookworm-arm64", "bookworm", "arm64", "aarch64", "3.11", "2.36", "wheel", "wheel", always=False),
    Target("bookworm-armhf", "bookworm", "armhf", "armv7l", "3.11", "2.36", "wheel", "build", always=False),
]

HOLD = r"""
set -euo pipefail
lower=$1 upper=$2 work=$3 root=$4
mount --make-rprivate /
mount -t overlay overlay -o "lowerdir=$lower,upperdir=$upper,workdir=$work" "$root"
mount --rbind /dev "$root/dev"
mount -t proc proc "$root/proc"
mount -t sysfs sysfs "$root/sys"
mount -t tmpfs tmpfs "$root/run"
mount -t tmpfs tmpfs "$root/tmp"
exec sleep infinity
"""


def emulation_ready(machine: str) -> str | None:
    """Why ``machine`` code cannot run here (None: it can), after trying to set it up: Debian's
    qemu-user-static registers its interpreters with binfmt_misc when it installs."""
    binfmt = Path("/proc/sys/fs/binfmt_misc")
    if not (binfmt / "status").exists():
        subprocess.run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(binfmt)], capture_output=True, check=False)
    entry = {"aarch64": "qemu-aarch64", "armv7l": "qemu-arm"}[machine]
    if not (binfmt / entry).exists():
        subprocess.run(["apt-get", "install", "-y", "-q", "qemu-user-static", "binfmt-support", "debootstrap"],
                       capture_output=True, timeout=900, check=False, env={**os.environ,
                                                                           "DEBIAN_FRONTEND": "noninteractive"})
        subprocess.run(["update-binfmts", "--enable"], capture_output=True, check=False)
    if not (binfmt / entry).exists():
        return f"no binfmt_misc entry {entry}: apt-get install qemu-user-static binfmt-support"
    return None


class Chroot:
    """An overlay of a cached root, mounted in a private mount namespace held by a sleeping process, entered with
    ``nsenter`` and ``chroot``: systemctl sees a chroot (PID 1 is outside it) and works offline."""

    def __init__(self, lower: Path, work: Path) -> None:
        self.lower = lower
        self.upper, self.workdir, self.root = work / "upper", work / "work", work / "root"
        for d in (self.upper, self.workdir, self.root):
            d.mkdir(parents=True)
        self.holder: subprocess.Popen[bytes] | None = None
        self.pid = 0

    def start(self) -> None:
        self.holder = subprocess.Popen(["unshare", "--fork", "--mount", "bash", "-c", HOLD, "hold", str(self.lower),
                                        str(self.upper), str(self.workdir), str(self.root)],
                                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        children = Path(f"/proc/{self.holder.pid}/task/{self.holder.pid}/children")

        def sleeping() -> int:
            assert self.holder is not None
            if self.holder.poll() is not None:
                raise AssertionError(f"the mounts failed: {self.holder.stderr.read().decode()}")  # type: ignore[union-attr]
            with contextlib.suppress(OSError, ValueError, IndexError):
                pid = int(children.read_text().split()[0])
                if Path(f"/proc/{pid}/comm").read_text().strip() == "sleep":
                    return pid
            return 0

        self.pid = int(wait_until(sleeping, 60, "the namespace never came up"))  # type: ignore[arg-type]

    def argv(self, *args: str, net: int | None = None) -> list[str]:
        enter = ["nsenter", f"--mount=/proc/{self.pid}/ns/mnt"]
        if net is not None:
            enter.append(f"--net=/proc/{net}/ns/net")
        # SYSTEMD_OFFLINE=1: what systemctl does in a chroot it recognises (PID 1's root is not readable here)
        env = [f"{key}={value}" for key, value in {**CONTAINER_ENV, "SYSTEMD_OFFLINE": "1"}.items()]
        return [*enter, "--", "chroot", str(self.root), "/usr/bin/env", "-i", *env, *args]

    def run(self, *args: str, check: bool = True, timeout: float = 1800.0, net: int | None = None,
            ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(self.argv(*args, net=net), capture_output=True, text=True, timeout=timeout,
                                check=False)
        if check:
            assert result.returncode == 0, (args, result.stdout[-3000:], result.stderr[-3000:])
        return result

    def write(self, path: str, text: str) -> None:
        result = subprocess.run(self.argv("sh", "-c", 'mkdir -p "$(dirname "$1")" && cat > "$1"', "write", path),
                                input=text, capture_output=True, text=True, timeout=300, check=False)
        assert result.returncode == 0, result.stderr

    def stop(self) -> None:
        if self.holder is None:
            return
        self.holder.kill()
        if self.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, 9)
        self.holder.wait(60)


@contextlib.contextmanager
def broker_namespace(tmp_path: Path) -> Iterator[int]:
    """A network namespace with its loopback up and a mosquitto (the host's) on 1883, the port the
    demo is sent to (``--broker``); yields the pid that holds the namespace."""
    mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not Path(mosquitto).exists():
        pytest.fail("mosquitto is needed on the host: apt-get install mosquitto")
    conf = tmp_path / "mosquitto.conf"
    conf.write_text("listener 1883 127.0.0.1\nallow_anonymous true\npersistence false\n")
    holder = subprocess.Popen(["unshare", "--net", "--fork", "sh", "-c",
                               f"ip link set lo up && exec {mosquitto} -c {conf}"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        children = Path(f"/proc/{holder.pid}/task/{holder.pid}/children")

        def listening() -> int:
            with contextlib.suppress(OSError, ValueError, IndexError):
                pid = int(children.read_text().split()[0])
                tcp = Path(f"/proc/{pid}/net/tcp").read_text()
                if ":075B " in tcp:  # 1883, listening
                    return pid
            assert holder.poll() is None, holder.stderr.read().decode() if holder.stderr else ""
            return 0

        broker = int(wait_until(listening, 60, "mosquitto never listened in its namespace"))  # type: ignore[arg-type]
        try:
            yield broker
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(broker, 9)  # unshare's child: killing unshare alone leaves it running
    finally:
        holder.kill()
        holder.wait(30)


def pss_kb(pids: list[int]) -> int:
    """The summed PSS of ``pids`` in kB (smaps_rollup), qemu's own memory included under emulation."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
    return total


def gateway_pids() -> list[int]:
    """The demo's panel and storage processes, as the host sees them (their qemu interpreters)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if "qemu" in cmd and ("-m gateway_sim.demo" in cmd or "gateway.uplink.process" in cmd):
                found.append(int(entry.name))
    return found


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root (debootstrap, namespaces, mounts, binfmt_misc)"
    missing = [tool for tool in ("unshare", "nsenter", "chroot", "ip", "git") if shutil.which(tool) is None]
    return f"missing {', '.join(missing)}" if missing else None


@pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or "")
@pytest.mark.parametrize("target", [pytest.param(t, id=t.name, marks=() if t.always else pytest.mark.skipif(
    os.environ.get("GATEWAY_REHEARSE_ALL") != "1",
    reason=f"{t.name} runs only with GATEWAY_REHEARSE_ALL=1 (20-40 minutes under emulation, past CI's budget)"))
    for t in TARGETS])
def test_emulated_install(target: Target, tmp_path: Path) -> None:
    timings: dict[str, float] = {}
    started = time.monotonic()

    def lap(name: str) -> None:
        timings[name] = round(time.monotonic() - started - sum(timings.values()), 1)

    reason = emulation_ready(target.machine)
    if reason is not None:
        pytest.fail(reason)
    lower, cold = cached_root(target.name, target.debootstrap)
    lap("debootstrap (cold)" if cold else "cached root")

    chroot = Chroot(lower, tmp_path)
    checkout_copy(chroot.upper / "root/gateway")
    wheels = chroot.upper / "root/wheels"
    wheelhouse(wheels, "--python-version", target.python, "--machine", target.machine, "--glibc", target.glibc)
    # lgpio built from source under emulation takes most of an install: the first run (a fresh machine, a new lock)
    # builds it through install.sh, and later runs hand install.sh that wheel, as a technician may (--wheels)
    lock_key = hashlib.sha256((ROOT / "constraints/runtime.txt").read_bytes()).hexdigest()[:16]
    built = CACHE / f"lgpio-{target.name}-{lock_key}"
    lgpio_from = target.lgpio
    if target.lgpio == "build" and built.is_dir():
        for wheel in built.glob("lgpio-*.whl"):
            shutil.copy(wheel, wheels)
        lgpio_from = "wheel"
    tools = chroot.upper / "root/test-wheels"
    pins = TEST_TOOLS  # their newest releases for the target's Python (this machine may hold newer ones)
    fetched = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
                              "--only-binary=:all:", "--python-version", target.python, "--platform", "any",
                              "--implementation", "py", "-d", str(tools), *pins], capture_output=True, text=True,
                             timeout=600, check=False)
    if fetched.returncode != 0:  # some of their dependencies are tagged for the interpreter: ask for those too
        fetched = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
                                  "-d", str(tools), *pins], capture_output=True, text=True, timeout=600, check=False)
    assert fetched.returncode == 0, fetched.stderr[-2000:]
    lap("wheels on the host")

    demo_pss = 0
    try:
        chroot.start()
        assert chroot.run("uname", "-m").stdout.strip() == target.machine

        # 1. the installer, offline from the wheelhouse
        install = chroot.run("bash", "/root/gateway/scripts/install.sh", "--wheels", "/root/wheels", timeout=3600)
        lap("install.sh")
        assert f"lgpio: {lgpio_from} ({target.machine}, Python {target.python}." in install.stdout, \
            install.stdout[-3000:]
        if lgpio_from == "build":
            made = list((chroot.upper / "root/.cache/pip/wheels").rglob("lgpio-*.whl"))
            assert made, "no lgpio wheel in pip's cache after the build"
            partial = CACHE / f"{built.name}.partial-{os.getpid()}"
            partial.mkdir(parents=True, exist_ok=True)
            shutil.copy(made[0], partial)
            with contextlib.suppress(OSError):
                partial.rename(built)
            shutil.rmtree(partial, ignore_errors=True)
        assert "keep: gatewayd.service not started: /etc/gateway/building.toml is the shipped example" \
            in install.stdout
        assert chroot.run("systemctl", "is-enabled", "gatewayd", check=False).stdout.strip() == "enabled"
        have = installed(chroot.run, "/opt/gateway/venv/bin/python")
        locked = locked_pins(target.machine)
        assert {n: have[n] for n in locked if n in have} == {n: v for n, v in locked.items()
                                                                       if n in have}
        assert f"python-gammu: {target.gammu} ({target.machine}, Python {target.python}." in install.stdout, \
            install.stdout[-3000:]
        assert {"lgpio", "msgspec", "gpiozero", "pymodbus", "python-gammu"} <= set(have), sorted(have)
        chroot.run("/opt/gateway/venv/bin/python", "-c", "import lgpio, msgspec, gammu")
        if target.gammu == "build":  # linked against Debian's shared libGammu, not a copy bundled in a wheel
            linked = chroot.run("sh", "-c", "ldd /opt/gateway/venv/lib/python3*/site-packages/gammu/_gammu*.so").stdout
            gammu_lib = next((line.split("=>")[1].split()[0] for line in linked.splitlines() if "libGammu.so" in line
                              and "=>" in line), "")
            assert gammu_lib.startswith(("/lib/", "/usr/lib/")), linked  # Debian's (/lib is /usr/lib, merged)

        # 2. an edited site passes config check; doctor names the platform
        example = (ROOT / "examples/building.toml").read_text()
        site = example.replace("[runtime]", '[runtime]\npin_factory = "mock"', 1) if "[runtime]" in example \
            else example + '\n[runtime]\npin_factory = "mock"\n'
        chroot.write("/etc/gateway/building.toml", "# edited for this building\n" + site)
        check = chroot.run("gatewayctl", "config", "check", "/etc/gateway/building.toml", timeout=600)
        assert "ok" in check.stdout, check.stdout
        doctor = json.loads(chroot.run("gatewayctl", "doctor", "--json", check=False, timeout=600).stdout)
        platform = {c["name"]: c for c in doctor["data"]["checks"]}["platform"]["detail"]
        release = {"trixie": "Debian GNU/Linux 13 (trixie)", "bookworm": "Debian GNU/Linux 12 (bookworm)"}
        assert f"{release[target.suite]}; {target.machine}; Python {target.python}." in platform, platform
        lap("config check and doctor")

        # 3. lgpio for real: no gpiochip under emulation, one line and exit 69
        chroot.write("/root/lgpio.toml", "# edited for this building\n" + example)
        gpio = chroot.run("gatewayd", "--config", "/root/lgpio.toml", check=False, timeout=600)
        assert gpio.returncode == 69, (gpio.stdout[-2000:], gpio.stderr[-2000:])
        assert gpio.stderr == "gatewayd: gpio: cannot open /dev/gpiochip0 (lgpio): No such file or directory\n"

        # 4. the demo, its alarm at a broker: the install carries no simulator (one line, exit 78), so the demo
        #    takes the checkout's gateway_sim/, alone on the path, with the installed gateway
        refused = chroot.run("gatewayd", "--demo", "--duration", "5", check=False, timeout=600)
        assert refused.returncode == 78, (refused.stdout[-2000:], refused.stderr[-2000:])
        assert refused.stderr.startswith("gatewayd: --demo: the simulator (gateway_sim) is not installed"), \
            refused.stderr
        chroot.run("sh", "-c", "mkdir -p /root/sim && ln -sfn /root/gateway/gateway_sim /root/sim/gateway_sim")
        with broker_namespace(tmp_path) as net:
            listen = subprocess.Popen(chroot.argv("/opt/gateway/venv/bin/python", "-c", SUBSCRIBER, net=net),
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            # the demo forwards to the broker it is given (gatewayd --demo would start a mosquitto of its own)
            demo = subprocess.Popen(chroot.argv("PYTHONPATH=/root/sim", "/opt/gateway/venv/bin/python", "-m",
                                                "gateway_sim.demo", "--duration", "40", "--broker", "127.0.0.1:1883",
                                                net=net),
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            try:
                seen = chroot.upper / "root/alarm-seen"

                def alarm_at_the_broker() -> bool:
                    if demo.poll() is not None and not seen.exists():
                        raise AssertionError(f"the demo ended ({demo.returncode}) with no alarm at the broker: "
                                             f"{demo.stderr.read()[-3000:] if demo.stderr else ''}")
                    return seen.exists() and '"level": "high"' in seen.read_text().replace('":"', '": "')

                wait_until(alarm_at_the_broker, 600, "the demo's alarm never reached the broker")
                demo_pss = pss_kb(gateway_pids())
                _, err = demo.communicate(timeout=600)
                assert demo.returncode == 0, err[-3000:]
            finally:
                for proc in (demo, listen):
                    if proc.poll() is None:
                        proc.kill()
                        proc.wait(30)
        lap("demo")

        # 5. the pure alarm core's tests and the panel-process tests, inside the root. For Bookworm (Python 3.11, the
        #    build machine's own) only with GATEWAY_REHEARSE_ALL=1: about 11 minutes under emulation, beyond CI's time
        if target.tests_always or os.environ.get("GATEWAY_REHEARSE_ALL") == "1":
            tools_in = chroot.run("/opt/gateway/venv/bin/pip", "install", "--no-index", "--find-links",
                                  "/root/test-wheels", *pins, timeout=1800)
            found = chroot.run("/opt/gateway/venv/bin/python", "-c", "import pytest", check=False)
            assert found.returncode == 0, tools_in.stdout[-3000:] + found.stderr[-1000:]
            tests = chroot.run("sh", "-c", "cd /root/gateway && /opt/gateway/venv/bin/python -m pytest -q "
                               f"-p no:cacheprovider -k '{UNTIMED}' {' '.join(TESTS_INSIDE)}", check=False,
                               timeout=3600)
            assert tests.returncode == 0, tests.stdout[-4000:] + tests.stderr[-2000:]
            passed = tests.stdout.strip().splitlines()[-1]
        else:
            passed = "not run here (GATEWAY_REHEARSE_ALL=1 runs them)"
        lap("tests inside")
    finally:
        chroot.stop()

    print(f"\nemulated install {target.name} ({'cold' if cold else 'cached root'}, lgpio {lgpio_from}, "
          f"python-gammu {target.gammu}, "
          f"under emulation): {round(time.monotonic() - started, 1)} s; demo PSS {demo_pss} kB (qemu included); "
          f"tests: {passed}; "
          + ", ".join(f"{k} {v} s" for k, v in timings.items()))


#: Inside the root, on the broker's network: the demo's building's messages, until its high alarm event shows.
SUBSCRIBER = r"""
import json, time
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

def on_message(client, userdata, message):
    if message.topic.endswith("/event/alarm") and json.loads(message.payload).get("level") == "high":
        with open("/root/alarm-seen", "w") as out:
            out.write(message.topic + " " + message.payload.decode())

client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="rehearsal-listener")
client.on_message = on_message
client.on_connect = lambda c, u, f, rc, p: c.subscribe("#", qos=1)
client.connect("127.0.0.1", 1883)
client.loop_start()
time.sleep(900)
"""


@pytest.fixture(autouse=True)
def _no_leftover_mounts(tmp_path: Path) -> Iterator[None]:
    """The overlay lives in the namespace that dies with its holder: nothing stays mounted on the host."""
    yield
    assert str(tmp_path) not in Path("/proc/self/mountinfo").read_text()
