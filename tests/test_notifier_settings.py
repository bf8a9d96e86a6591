"""fleet/notifier.py without a database: bad settings name their key; the acknowledgement
token is the delivery id with an HMAC that a changed id or MAC, or another secret, does not match; a sending
lane keeps its HTTP connection."""

from __future__ import annotations

from pathlib import Path

import pytest

from fleet.contacts import Contacts
from fleet.notifier import SettingsError, _token_delivery, load_settings, make_token


def _write(tmp_path: Path, text: str, secret: str = "0123456789abcdef0123") -> Path:
    (tmp_path / "notifier.secret").write_text(secret + "\n", encoding="utf-8")
    path = tmp_path / "notifier.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_the_example_file_loads(tmp_path: Path) -> None:
    example = Path(__file__).resolve().parents[1] / "fleet" / "notifier.example.toml"
    s = load_settings(_write(tmp_path, example.read_text(encoding="utf-8")), dsn="", contacts=Contacts(), name="n")
    assert s.ladder.steps == (("relative", "unit head"), ("building head", "grid worker"), ("duty desk",))
    assert (s.ladder.escalate_after_s, s.ladder.alone_escalate_after_s, s.retry.max_attempts) == (120.0, 60.0, 8)
    assert s.in_flight == 4


@pytest.mark.parametrize(("text", "key"), [
    ('[notifier]\nsecret_file = "notifier.secret"\n', "notifier.community"),
    ('[notifier]\ncommunity = "c1"\n', "notifier.secret_file"),
    ('[notifier]\ncommunity = "c1"\nsecret_file = "missing"\n', "notifier.secret_file"),
    ('[notifier]\ncommunity = "c1"\nsecret_file = "notifier.secret"\nsms_url = "twilio://a:b@+1"\n',
     "notifier.sms_url"),
    ('[notifier]\ncommunity = "c1"\nsecret_file = "notifier.secret"\n[ladder]\nescalate_after_s = -1\n',
     "ladder.escalate_after_s"),
    ('[notifier]\ncommunity = "c1"\nsecret_file = "notifier.secret"\nin_flight = 0\n', "notifier.in_flight"),
    ('[notifier]\ncommunity = "c1"\nsecret_file = "notifier.secret"\n[ladder]\nsteps = [{roles = []}]\n',
     "ladder.steps"),
])
def test_a_bad_setting_names_its_key(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(SettingsError, match=key.replace(".", r"\.")):
        load_settings(_write(tmp_path, text), dsn="", contacts=Contacts(), name="n")


def test_a_short_secret_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="at least 16 bytes"):
        load_settings(_write(tmp_path, '[notifier]\ncommunity = "c1"\nsecret_file = "notifier.secret"\n', "short"),
                      dsn="", contacts=Contacts(), name="n")


def test_settings_from_a_file(tmp_path: Path) -> None:
    s = load_settings(_write(tmp_path, '[notifier]\ncommunity = "c1"\nsecret_file = "notifier.secret"\n'
                                       'sms_url = "json://localhost/sms/{phone}"\npublic_url = "https://desk/"\n'
                                       '[ladder]\nescalate_after_s = 30\n[retry]\nbase_s = 1\n'),
                      dsn="x", contacts=Contacts(), name="n")
    assert (s.community, s.public_url, s.ladder.escalate_after_s, s.retry.base_s) == ("c1", "https://desk", 30.0, 1.0)
    assert s.secret == b"0123456789abcdef0123"


def test_an_acknowledgement_token_cannot_be_guessed_or_altered() -> None:
    secret = b"0123456789abcdef0123"
    token = make_token(secret, 42)
    assert _token_delivery(secret, token) == 42
    assert _token_delivery(b"another-secret-0123456", token) is None
    assert _token_delivery(secret, make_token(secret, 43).replace("43.", "42.")) is None
    assert _token_delivery(secret, token[:-1] + ("0" if token[-1] != "0" else "1")) is None
    for junk in ("", "42", "x.y", "9" * 40 + "." + token.split(".")[1]):
        assert _token_delivery(secret, junk) is None


def test_the_notifier_benchmark_prints_its_json_line_when_a_package_is_missing(tmp_path: Path) -> None:
    """psycopg made unimportable (a package of that name that raises ImportError, first on the path)."""
    import json
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    (tmp_path / "psycopg").mkdir()
    (tmp_path / "psycopg" / "__init__.py").write_text('raise ImportError("No module named psycopg")\n')
    run = subprocess.run([sys.executable, str(root / "benchmarks" / "notifier.py"), "--alarms", "10"],
                         env={**os.environ, "PYTHONPATH": str(tmp_path)}, capture_output=True, text=True, timeout=60)
    last = json.loads(run.stdout.strip().splitlines()[-1])
    assert last["alarms"] == 10 and "psycopg" in last["error"], run.stderr


def test_a_lane_keeps_its_http_connection_and_nothing_else(monkeypatch: pytest.MonkeyPatch) -> None:
    """Apprise's requests.post from one lane reuse one connection (the receiver sees one client port); another
    thread has its own; a connection idle too long is not reused."""
    import threading

    import requests

    import fleet.notifier as notifier
    from tests.support.notifier import Receiver

    monkeypatch.setattr(requests.api, "request", requests.api.request)  # restored after the test
    monkeypatch.setattr(requests, "request", requests.request)
    notifier.keep_connections()
    receiver = Receiver()
    try:
        url = f"http://127.0.0.1:{receiver.port}/to/x"

        def post(n: int) -> None:
            for i in range(n):
                assert requests.post(url, json={"title": "t", "message": f"m{i}"}, timeout=10).status_code == 200

        post(3)
        other = threading.Thread(target=post, args=(2,))
        other.start()
        other.join()
        ports = [m.client_port for m in receiver.messages]
        assert ports[0] == ports[1] == ports[2] and ports[3] == ports[4] != ports[0], ports
        monkeypatch.setattr(notifier, "KEEP_ALIVE_S", 0.0)
        post(1)
        assert receiver.messages[-1].client_port != ports[0]
    finally:
        receiver.close()
