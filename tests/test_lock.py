"""The lock (constraints/runtime.txt) agrees with pyproject.toml, the test tools are bounded, and the wheel a
building installs carries the daemon, the CLI and the drivers only: no simulator."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "constraints/runtime.txt"


def lock_check(pyproject: Path, lock: Path = LOCK) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(ROOT / "scripts/lock"), "--check", "--pyproject", str(pyproject),
                           "--lock", str(lock)], capture_output=True, text=True, timeout=60, check=False)


def test_the_lock_agrees_with_pyproject() -> None:
    result = lock_check(ROOT / "pyproject.toml")
    assert result.returncode == 0, result.stderr
    assert "agrees with pyproject.toml" in result.stdout


def test_a_dependency_added_without_a_new_lock_fails(tmp_path: Path) -> None:
    text = (ROOT / "pyproject.toml").read_text()
    edited = tmp_path / "pyproject.toml"
    edited.write_text(text.replace('    "pyserial>=3.5,<4",\n', '    "pyserial>=3.5,<4",\n    "tomli-w>=1",\n', 1))
    result = lock_check(edited)
    assert result.returncode == 1
    assert "tomli-w is a dependency but not in runtime.txt" in result.stderr
    assert "run scripts/lock" in result.stderr


def test_a_range_that_excludes_the_pinned_version_fails(tmp_path: Path) -> None:
    edited = tmp_path / "pyproject.toml"
    edited.write_text((ROOT / "pyproject.toml").read_text().replace('"pymodbus==3.16.1"', '"pymodbus==3.16.2"', 1))
    result = lock_check(edited)
    assert result.returncode == 1
    assert "pymodbus==3.16.1 in runtime.txt is outside ==3.16.2" in result.stderr


def test_a_loose_line_in_the_lock_fails(tmp_path: Path) -> None:
    lock = tmp_path / "runtime.txt"
    lock.write_text(LOCK.read_text().replace("pyserial==3.5", "pyserial>=3.5", 1))
    result = lock_check(ROOT / "pyproject.toml", lock)
    assert result.returncode == 1
    assert "not an exact pin: pyserial>=3.5" in result.stderr


def test_every_runtime_dependency_and_what_it_needs_is_pinned() -> None:
    """The closure as this interpreter sees it: each pinned package installed here at its pinned version has its
    own requirements pinned too (scripts/lock --check does this; here it must have had something to look at)."""
    from importlib.metadata import version

    pinned = [line.split("==")[0] for line in LOCK.read_text().splitlines() if "==" in line and line[0] != "#"]
    installed_at_pin = [name for name in pinned if f"{name}=={version(name)}" in LOCK.read_text()]
    assert {"gpiozero", "colorzero", "msgspec"} <= set(installed_at_pin), installed_at_pin  # two with requirements


def test_the_tools_that_judge_the_code_have_upper_bounds() -> None:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["test"]
    bounds = {Requirement(text).name: Requirement(text).specifier for text in extras}
    for tool in ("ruff", "mypy", "pytest"):
        assert any(spec.operator in ("<", "<=", "==") for spec in bounds[tool]), f"{tool} has no upper bound"


def test_install_sh_installs_with_the_lock() -> None:
    script = (ROOT / "scripts/install.sh").read_text()
    assert "constraints/runtime.txt" in script
    assert "--constraint" in script


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel a building installs, built from a copy of this checkout as a fresh clone has it: setuptools puts
    whatever an earlier build left in build/lib into the wheel (scripts/install.sh clears it first, too)."""
    source = tmp_path_factory.mktemp("source") / "checkout"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", ".venv*", "build", "*.egg-info", "__pycache__", ".*_cache", ".hypothesis", "var"))
    out = tmp_path_factory.mktemp("wheel")
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                             "-w", str(out), str(source)], capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    return next(out.glob("building_safety_gateway-*.whl"))


@pytest.mark.timeout(300)
def test_the_wheel_carries_the_daemon_cli_and_drivers_only(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/")[0] for name in names}
    assert {"gateway", "drivers"} <= tops
    assert not {"fleet", "tests", "benchmarks", "gateway_sim"} & tops, sorted(tops)
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "gatewayd = gateway.daemon:main" in entry_points
    assert "gatewayctl = gateway.ops.cli:main" in entry_points


@pytest.mark.timeout(300)
def test_the_wheel_carries_no_simulator(wheel: Path) -> None:
    """No module of the simulator (pty null modem, wire timing, simulated devices and bus, the demo) reaches a Pi,
    under any name: listed from the wheel itself, and checked by what each module imports."""
    archive = zipfile.ZipFile(wheel)
    modules = [name for name in archive.namelist() if name.endswith(".py")]
    assert not [m for m in modules if any(word in m for word in ("gateway_sim", "simulat", "demo"))], modules
    for module in modules:
        text = archive.read(module).decode()
        assert "pymodbus.server" not in text and "pymodbus.simulator" not in text and "os.openpty" not in text, module


@pytest.mark.timeout(300)
def test_the_installed_daemon_refuses_the_demo_in_one_line(wheel: Path, tmp_path: Path) -> None:
    """``gatewayd --demo`` on an install (the wheel's files alone, no checkout beside them): one line naming
    ``--demo`` and the simulator, EX_CONFIG, no traceback."""
    unpacked = tmp_path / "site-packages"
    zipfile.ZipFile(wheel).extractall(unpacked)
    result = subprocess.run([sys.executable, "-m", "gateway.daemon", "--demo", "--duration", "1"], cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": str(unpacked)}, capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == 78, result.stdout + result.stderr
    assert result.stderr.splitlines() == [
        "gatewayd: --demo: the simulator (gateway_sim) is not installed: a building's install does not carry it; "
        "run scripts/demo in a source checkout"], result.stderr


def test_a_package_pinned_per_machine_is_checked_pin_by_pin(tmp_path: Path) -> None:
    """python-gammu is pinned per machine (a wheel on 64-bit, Debian's libGammu on 32-bit Pi OS): each pin must
    meet the requirement of its own marker, and the rehearsals install the one their machine selects."""
    from tests.test_install_rehearsal import locked_pins

    assert locked_pins("armv7l")["python-gammu"] == "3.2.5"
    assert locked_pins("aarch64")["python-gammu"] == locked_pins("x86_64")["python-gammu"] != "3.2.5"
    lock = tmp_path / "runtime.txt"
    lock.write_text(LOCK.read_text().replace("python-gammu==3.2.5 ;", "python-gammu==3.2.4 ;", 1))
    result = lock_check(ROOT / "pyproject.toml", lock)
    assert result.returncode == 1
    assert "python-gammu==3.2.4 in runtime.txt is outside ==3.2.5" in result.stderr
