"""The SMS path on 32-bit Pi OS's python-gammu: the lock's pin for armv7l, built here against Debian's libGammu.

PyPI has no 32-bit ARM wheel of python-gammu, and the releases after 3.2.5 need a libGammu newer than Debian's
(1.42.0 in Bookworm and Trixie), so 32-bit Pi OS runs another python-gammu on another libGammu than every other
target (docs/deploy.md, "Targets"). Gammu 1.42's AT driver starts a modem differently (it powers the radio on with
``AT+CFUN=1``, and the simulated modem once refused it: no modem ever came up). This builds that pin against
Debian's ``libgammu-dev`` on this machine, puts it in front of the virtualenv's, and runs the modem tests and the
broker-killed SMS test against the simulated modem with it. The emulated armhf rehearsal
(tests/test_emulated_install.py) installs the same pin under emulation but runs no SMS test there.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_install_rehearsal import CACHE, locked_pins

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

TESTS = [
    "tests/test_sms.py::test_a_60_character_chinese_text_goes_in_one_part",
    "tests/test_sms.py::test_a_200_character_text_goes_in_parts_that_gammu_joins_back",
    "tests/test_sms.py::test_a_refused_submission_is_an_error_and_the_next_one_goes",
    "tests/test_sms_path.py::test_broker_killed_an_alarm_goes_by_sms_once_in_chinese_and_the_fault_clears_when_it_returns",
]


def built_gammu(version: str) -> Path:
    """python-gammu ``version`` built against this machine's libGammu, in a directory for PYTHONPATH (kept in the
    rehearsal cache by version and libGammu's)."""
    if not Path("/usr/include/gammu/gammu.h").exists() or shutil.which("pkg-config") is None:
        pytest.skip("libgammu-dev and pkg-config are needed: apt-get install libgammu-dev pkg-config")
    libgammu = subprocess.run(["pkg-config", "--modversion", "gammu"], capture_output=True, text=True,
                              check=True).stdout.strip()
    target = CACHE / f"python-gammu-{version}-libgammu-{libgammu}-py{sys.version_info[0]}{sys.version_info[1]}"
    if not (target / "gammu").is_dir():
        partial = target.with_name(target.name + f".partial-{os.getpid()}")
        shutil.rmtree(partial, ignore_errors=True)
        result = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                                 "--no-deps", "--no-binary", "python-gammu", "--target", str(partial),
                                 f"python-gammu=={version}"], capture_output=True, text=True, timeout=600,
                                check=False)
        assert result.returncode == 0, result.stderr[-3000:]
        CACHE.mkdir(parents=True, exist_ok=True)
        partial.rename(target)
    return target


def test_the_32_bit_pin_on_debians_libgammu_sends_and_reads_the_simulated_modem(tmp_path: Path) -> None:
    version = locked_pins("armv7l")["python-gammu"]
    target = built_gammu(version)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), str(ROOT)])}
    which = subprocess.run([sys.executable, "-c", "import gammu; print(gammu.__file__, gammu.Version()[1])"],
                           env=env, capture_output=True, text=True, timeout=60, check=True).stdout.split()
    assert which[0].startswith(str(target)) and which[1] == version.rsplit(".", 1)[0], which
    result = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:xdist", "-q",
                             "--basetemp", str(tmp_path / "run"), *TESTS], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=800, check=False)
    assert result.returncode == 0, result.stdout[-4000:]
    assert f"{len(TESTS)} passed" in result.stdout, result.stdout[-2000:]
