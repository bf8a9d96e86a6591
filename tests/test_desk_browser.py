"""The duty desk in a real browser: Debian's chromium, headless, through its chromedriver (Selenium), real clicks.

The whole path runs: a simulated gateway (the gateway's own outbox, writer and MQTT uplink) publishes to the
three-node NATS cluster (fleet/cluster.py), the central inbox stores the event and its routing in a private
PostgreSQL, the notifier opens the episode and tells step 1 through Apprise (a local HTTP receiver), the desk
(``python -m fleet.desk serve``) shows it.

* the alarm appears on the officer's open page within 2 s, without a reload;
* clicking Acknowledge stops the escalation, shows who acknowledged, and everyone told is told;
* an officer of another community cannot see it or act on it, on the page or through the HTTP API: a wrong
  password, a forged token, the other community's alarm id;
* an offline gateway is listed with the time it went offline; a household's history is one click away.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.support.broker import free_port
from tests.support.postgres import PostgresServer, find_pg_bin
from tests.support.wait import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
#: Chromium as root in a container, with nothing fetched from outside (docs/fleet.md, "Testing the desk").
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1280,1000")
COMMUNITY, OTHER = "c1", "c2"
STEP_S = 8.0
#: The issue's promise: an alarm on the page within 2 s of its detection, without a reload.
ON_PAGE_S = 2.0


def _require(ok: bool, what: str) -> None:
    """Skip without ``what``; under CI (CI=true) a missing tool is a failure (scripts/test installs them)."""
    if not ok:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"{what} is required under CI (scripts/test installs it)")
        pytest.skip(f"{what} is required")


def _http(method: str, url: str, body: dict[str, Any] | None = None, token: str | None = None) -> tuple[int, Any]:
    headers = {"accept": "application/json", "content-type": "application/json"}
    if token is not None:
        headers["authorization"] = f"Bearer {token}"
    data = json.dumps(body).encode() if body is not None else None
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data, method=method, headers=headers),
                                    timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def test_the_duty_desk_in_a_browser(tmp_path: Path) -> None:
    _require(os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK),
             "Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")
    _require(find_pg_bin() is not None and (os.geteuid() != 0 or shutil.which("runuser") is not None),
             "PostgreSQL server binaries (apt-get install postgresql)")
    from selenium import webdriver
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    from fleet.cluster import Cluster, Community
    from tests.support.fleet import _Lines
    from tests.support.notifier import (
        GatewayThread,
        Receiver,
        start_desk,
        start_notifier,
        write_contacts,
        write_notifier_config,
    )

    (tmp_path / "community.toml").write_text(
        f'[community]\nid = "{COMMUNITY}"\nprefix = "safety"\npassword_seed = "desk-test-seed-0123456789"\n'
        '[server]\nuser = "central-server"\n[[buildings]]\nid = "b1"\n[[buildings]]\nid = "b2"\n', encoding="utf-8")
    community = Community.load(tmp_path / "community.toml")
    (tmp_path / "central.pw").write_text(community.server_password + "\n", encoding="utf-8")
    receiver = Receiver()
    desk_port = free_port()
    desk_url = f"http://127.0.0.1:{desk_port}"
    write_contacts(tmp_path / "contacts.toml", receiver, COMMUNITY, {
        "b1": {"units": ["u1"], "households": {"u1-101": {"relatives": 1}}},
        "b2": {"units": ["u1"], "households": {"u1-101": {"relatives": 1}}}})
    write_notifier_config(tmp_path / "notifier.toml", community=COMMUNITY, public_url=desk_url,
                          escalate_after_s=STEP_S, alone_escalate_after_s=STEP_S / 2)
    cluster = Cluster(tmp_path / "cluster", community)
    pg: PostgresServer | None = None
    procs: list[Any] = []
    gateways: GatewayThread | None = None
    driver: Any = None
    try:
        cluster.start()
        pg = PostgresServer(tmp_path / "pg").start()
        inbox = _Lines("inbox", [sys.executable, "-m", "fleet.inbox", "--nats", ",".join(cluster.nats_urls),
                                 "--user", community.server_user, "--password-file", str(tmp_path / "central.pw"),
                                 "--dsn", pg.dsn, "--community", COMMUNITY, "--contacts",
                                 str(tmp_path / "contacts.toml"), "--name", "inbox-1"], tmp_path / "inbox.log")
        procs.append(inbox)
        inbox.wait_for(lambda m: m.get("event") == "consuming", 60)
        procs.append(start_notifier(tmp_path, pg.dsn, "notifier-1"))
        procs.append(start_desk(tmp_path, pg.dsn, desk_port, extra=[
            "--nats", ",".join(cluster.nats_urls), "--user", community.server_user,
            "--password-file", str(tmp_path / "central.pw")]))
        for login, where, name in (("ana", COMMUNITY, "Ana Li"), ("bo", OTHER, "Bo Chen")):
            subprocess.run([sys.executable, "-m", "fleet.desk", "add-officer", "--dsn", pg.dsn, "--login", login,
                            "--community", where, "--name", name], input=f"{login}-password-123\n", text=True,
                           check=True, capture_output=True, timeout=60)
        gateways = GatewayThread(tmp_path, COMMUNITY, ["b1", "b2"], cluster.mqtt_hosts[0],
                                 community.credentials())
        wait_until(lambda: gateways.connected("b1") and gateways.connected("b2"), timeout=30)
        gateways.stop("b2")  # a planned stop: b2 says it goes offline

        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium'}"):
            options.add_argument(flag)
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
        driver.implicitly_wait(0)

        def log_in(login: str, password: str) -> None:
            driver.get(f"{desk_url}/login")
            driver.find_element(By.ID, "login-name").send_keys(login)
            driver.find_element(By.ID, "password").send_keys(password)
            driver.find_element(By.ID, "login-button").click()

        def shown(by: str, what: str) -> str:
            """An element's text, or "" while the page is being replaced (a navigation or the board's refresh
            swaps the element out between finding it and reading it): the waits below then look again."""
            try:
                return str(driver.find_element(by, what).text)
            except (NoSuchElementException, StaleElementReferenceException):
                return ""

        def text() -> str:
            return shown(By.TAG_NAME, "body")

        def click(selector: str) -> None:
            """A real click on what ``selector`` finds, found again if the board's refresh replaced it first."""
            def clicked() -> bool:
                try:
                    driver.find_element(By.CSS_SELECTOR, selector).click()
                except (NoSuchElementException, StaleElementReferenceException):
                    return False
                return True

            wait_until(clicked, timeout=10, message=f"nothing to click at {selector}")

        # A new user's first mistake: the wrong password. Still the login page, and nothing shown.
        log_in("ana", "not-the-password")
        assert "Wrong login or password" in text() and driver.current_url.endswith("/login")
        log_in("ana", "ana-password-123")
        wait_until(lambda: "Duty desk · c1" in text(), timeout=10, message=lambda: text())
        wait_until(lambda: driver.find_elements(By.CSS_SELECTOR, '.offline-gateway[data-gateway="c1-b2"]'),
                   timeout=10, message="b2's planned stop is not listed as offline")
        assert "planned stop" in shown(By.ID, "offline")
        driver.execute_script("window.sameDocument = 'yes';")  # gone if the page reloads

        # An alarm from the simulated gateway appears within 2 s, without a reload.
        detected = gateways.put("b1", "alarm", "raised", "u1-101", level="high", value=42.0, measure="%LEL")
        selector = 'article.episode[data-event^="c1-b1:"]'
        wait_until(lambda: driver.find_elements(By.CSS_SELECTOR, selector), timeout=15, interval=0.02,
                   message="the alarm never appeared on the page")
        on_page = time.time() - detected
        print(f"\nalarm on the page {on_page:.2f} s after its detection")
        assert driver.execute_script("return window.sameDocument;") == "yes", "the page was reloaded"
        assert on_page <= ON_PAGE_S, f"the alarm took {on_page:.2f} s to reach the page"
        article = driver.find_element(By.CSS_SELECTOR, selector)
        event_id = article.get_attribute("data-event")
        assert "gas alarm (high)" in article.text and "b1" in article.text and "u1-101" in article.text
        # Who was told, how, when, whether delivered: step 1 shows up as sent.
        wait_until(lambda: "sent" in shown(By.CSS_SELECTOR, selector), timeout=10,
                   message=lambda: shown(By.CSS_SELECTOR, selector))
        assert "Relative 0 of b1 u1-101" in shown(By.CSS_SELECTOR, selector)

        # Acknowledge with a click: the page shows who, everyone told is told, the ladder stops.
        click(f"{selector} button.ack")
        wait_until(lambda: driver.find_elements(By.CSS_SELECTOR, f"{selector} .acked-by"), timeout=10)
        wait_until(lambda: "Ana Li (duty desk)" in shown(By.CSS_SELECTOR, f"{selector} .acked-by"), timeout=10,
                   message=lambda: shown(By.CSS_SELECTOR, selector))
        receiver.wait_for(lambda _: {m.path for m in receiver.about(event_id, "ack")} >= {
            "/to/rel0-b1-u1-101", "/to/head-b1-u1"}, timeout=10, what="the acknowledgement told to step 1")
        with psycopg.connect(pg.dsn, autocommit=True) as c:
            opened = c.execute("SELECT extract(epoch FROM opened_at) FROM episodes WHERE event_id = %s",
                               (event_id,)).fetchone()
            assert opened is not None
            wait_until(lambda: time.time() > float(opened[0]) + STEP_S + 2.0, timeout=STEP_S + 5)
            steps = c.execute("SELECT max(step) FROM deliveries WHERE event_id = %s", (event_id,)).fetchone()
        assert steps == (1,), "the ladder went on after the acknowledgement"
        assert "/to/head-b1" not in {m.path for m in receiver.about(event_id)}

        # One household's history, a click away.
        click(f'{selector} a[href="/households/b1/u1-101"]')
        wait_until(lambda: "Household u1-101" in text(), timeout=10)
        assert "alarm" in shown(By.ID, "history")
        assert "Ana Li (duty desk)" in shown(By.ID, "history")

        # Another community's officer: sees none of it and cannot act on it.
        click("header form button")
        log_in("bo", "bo-password-123")
        wait_until(lambda: "Duty desk · c2" in text(), timeout=10)
        wait_until(lambda: shown(By.ID, "refreshed"), timeout=10)
        marks = [shown(By.ID, "refreshed")]

        def refreshed_twice() -> bool:  # two refreshes of the board after the page came
            mark = shown(By.ID, "refreshed")
            if mark and mark != marks[-1]:
                marks.append(mark)
            return len(marks) >= 3

        wait_until(refreshed_twice, timeout=15, message=lambda: f"the board did not refresh: {marks}")
        assert marks[-1].startswith("updated"), marks  # the other community's alarm is still not there
        assert not driver.find_elements(By.CSS_SELECTOR, "article.episode"), text()
        assert "c1-b2" not in text() and "Nothing open" in text()
        driver.get(f"{desk_url}/episodes/{event_id}")
        assert "No such alarm" in text()
        driver.get(f"{desk_url}/households/b1/u1-101")
        assert "Nothing recorded" in text()
        # The page's own form, pointed at the other community's alarm and submitted: refused.
        driver.get(f"{desk_url}/")
        driver.execute_script(
            "const f = document.createElement('form'); f.method = 'post'; f.action = arguments[0];"
            "document.body.appendChild(f); f.submit();", f"/episodes/{event_id}/ack")
        wait_until(lambda: "No such alarm" in text(), timeout=10)

        # The HTTP API, as a script would try it.
        api = f"{desk_url}/api"
        assert _http("POST", f"{api}/login", {"login": "bo", "password": "wrong"})[0] == 401
        assert _http("POST", f"{api}/login", {"login": "nobody", "password": "bo-password-123"})[0] == 401
        status, body = _http("POST", f"{api}/login", {"login": "bo", "password": "bo-password-123"})
        assert status == 200 and body["community"] == OTHER
        bo = body["token"]
        assert _http("GET", f"{api}/episodes", token=bo) == (200, {"community": OTHER, "episodes": []})
        assert _http("GET", f"{api}/episodes/{event_id}", token=bo)[0] == 404
        assert _http("POST", f"{api}/episodes/{event_id}/ack", token=bo)[0] == 404
        forged = bo[:-4] + ("AAAA" if not bo.endswith("AAAA") else "BBBB")
        for token in (forged, "", "x" * 300, None):
            assert _http("GET", f"{api}/episodes", token=token)[0] == 401, token
            assert _http("POST", f"{api}/episodes/{event_id}/ack", token=token)[0] == 401, token
        # The same calls with the right community's officer do reach it (so the refusals above are the scoping).
        status, body = _http("POST", f"{api}/login", {"login": "ana", "password": "ana-password-123"})
        ana = body["token"]
        status, episode = _http("GET", f"{api}/episodes/{event_id}", token=ana)
        assert status == 200 and episode["acked_by"] == "Ana Li (duty desk)"
        assert _http("POST", f"{api}/episodes/{event_id}/ack", token=ana) == (
            200, {"status": "already", "event_id": event_id, "by": "Ana Li (duty desk)"})
        with psycopg.connect(pg.dsn, autocommit=True) as c:
            hashes = c.execute("SELECT password_hash FROM officers ORDER BY login").fetchall()
        assert all(h[0].startswith("$argon2id$") for h in hashes)
    finally:
        if driver is not None:
            driver.quit()
        if gateways is not None:
            gateways.close()
        for p in reversed(procs):
            p.stop(signal.SIGTERM, timeout=20)
        receiver.close()
        cluster.stop()
        if pg is not None:
            pg.stop()
