"""The SMS process: the second path, a child of the panel beside (never through) the storage/uplink process.

The panel starts it (``python -m gateway.sms.process --config SITE --link-fd N``) when ``[sms]`` is configured,
restarts it when it ends, and hands it — over the same named messages as the storage process
(:mod:`gateway.link`) — every alarm, supervisory and fault event, the PUBACKs the uplink reported
(``delivered``) and the ``transmission`` fault. So it works while the MQTT process is dead or restarting. Its
settings come from the panel, which validated the site file (:mod:`gateway.sms.settings`), and it logs through
:mod:`gateway.sms.logger`: it imports neither the config machinery nor structlog, for memory.

Three threads: the link reader; the *queue* thread, which owns the rule (:class:`~gateway.sms.policy.SmsPolicy`),
commits what is owed (and the hand-over mark) before the panel is told it is stored, and turns due events into
messages; the *modem* thread, the only one that talks to the modem (python-gammu blocks), which sends the
messages in order, marks each sent only after the modem's OK, and checks the modem's health (the ``modem`` fault).
Phone numbers stay in this process and its queue file; logs and status show them masked.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import queue
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import msgspec

from gateway import link
from gateway.events import delivery_key
from gateway.heap import release_startup_heap
from gateway.sms import logger
from gateway.sms.contacts import Contacts, ContactsError, mask
from gateway.sms.messages import event_text, technician_test_text
from gateway.sms.modem import Modem, SendFailed
from gateway.sms.policy import HOUR_S, Owed, SmsPolicy
from gateway.sms.queue import SmsQueue
from gateway.sms.settings import SettingsError, SmsSettings

__all__ = ["SmsProcess", "main"]

log = logger.get_logger()

BEAT_S = 0.5
#: How often the queue thread looks for due events when nothing arrives.
TICK_S = 0.1
#: A message the modem refused is tried again after this, doubling up to RETRY_MAX_S. It is never dropped.
RETRY_MIN_S = 5.0
RETRY_MAX_S = 300.0
#: How long a test message's request waits for the modem's answer before it answers "queued".
TEST_WAIT_S = 8.0
#: The fault code of the modem's health.
MODEM_FAULT = "modem"
#: Sends refused in a row (``+CMS ERROR``: no credit, a wrong SMS centre, barred) that make the ``modem`` fault;
#: one refusal alone does not (a passing network hiccup). The next message the modem takes clears it.
REFUSALS_FAULT = 3
#: The fault code of a contacts file that cannot be used (missing, too open, malformed).
CONTACTS_FAULT = "sms_contacts"


class SmsProcess:
    """One building's SMS path, joined to its panel by ``sock``."""

    def __init__(self, sms: SmsSettings, sock: socket.socket, contacts: Contacts, *,
                 contacts_problem: str | None = None) -> None:
        """``contacts_problem``: why the contacts file could not be used (the ``sms_contacts`` fault)."""
        self.contacts_problem = contacts_problem
        self.sms = sms
        self._sock = sock
        self._send_lock = threading.Lock()
        self.contacts = contacts
        self.policy = SmsPolicy(mode=sms.mode, after_s=sms.after_s, max_per_hour=sms.max_per_hour)
        self._inbox: queue.SimpleQueue[dict[str, Any] | None] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._wake_modem = threading.Event()
        self._modem = Modem(sms.device, connection=sms.connection, pin=sms.pin, smsc=sms.smsc,
                            debug_file=os.environ.get("GATEWAY_GAMMU_DEBUG") or None)
        self._fault: str | None = None
        self._refused = 0  # sends refused in a row
        self._refusal: str | None = None  # the problem once REFUSALS_FAULT were
        self._waiting_tests: dict[int, Callable[[dict[str, Any], bool], None]] = {}
        self._tests_lock = threading.Lock()
        self._figures: dict[str, Any] = {}
        self.sent_total = 0

    # ------------------------------------------------------------------------------ run

    def run(self) -> int:
        """Serve until the panel says ``stop`` or its socket closes."""
        store = SmsQueue(self.sms.queue)
        self._restore(store)
        self._send("hello", handover=store.handover_mark(), pid=os.getpid())
        if self.contacts_problem is not None:
            self._send("fault", code=CONTACTS_FAULT, present=True, detail=self.contacts_problem)
        modem_thread = threading.Thread(target=self._modem_loop, name="sms-modem", daemon=True)
        modem_thread.start()
        reader = threading.Thread(target=self._read, name="sms-link", daemon=True)
        reader.start()
        log.info("sms process started", pid=os.getpid(), mode=self.sms.mode, after_s=self.sms.after_s,
                 contacts=self.contacts.counts(), owed=self.policy.owed(), heap_trimmed=release_startup_heap())
        try:
            self._queue_loop(store)
        finally:
            self._stop.set()
            self._wake_modem.set()
            modem_thread.join(timeout=60)
            store.close()
            log.info("sms process stopped")
        return 0

    def _restore(self, store: SmsQueue) -> None:
        """What was owed before a restart is owed still; what went in the last hour counts for the cap."""
        for key, body, made in store.owed():
            event = msgspec.json.decode(body)
            self.policy.owe(self._owed(key, event, made))
        for recipient, at in store.sent_since(time.time() - HOUR_S):
            self.policy.sent_before(recipient, at)

    def _owed(self, key: str, event: dict[str, Any], made: float) -> Owed:
        people = self.contacts.whom(str(event["kind"]), event.get("unit"), event.get("household"))
        return Owed(key, str(event["kind"]), str(event["action"]), event.get("device"), made,
                    tuple(p.phone for p in people))

    # ------------------------------------------------------------------------------ link

    def _send(self, kind: str, **body: Any) -> None:
        frame = link.encode(kind, **body)
        with self._send_lock, contextlib.suppress(OSError):
            self._sock.sendall(frame)

    def _read(self) -> None:
        try:
            while True:
                try:
                    frame = link.read_frame(self._sock)
                except (OSError, ConnectionError, link.BadMessage) as exc:
                    log.warning("link to the panel closed", error=str(exc))
                    return
                if frame is None:
                    return
                try:
                    self._inbox.put(link.decode(frame))
                except link.BadMessage as exc:
                    log.error("message from the panel rejected", reason=str(exc))
        finally:
            self._inbox.put(None)

    # ------------------------------------------------------------------------------ queue thread

    def _queue_loop(self, store: SmsQueue) -> None:
        next_beat = 0.0
        while True:
            try:
                batch = [self._inbox.get(timeout=TICK_S)]
                with contextlib.suppress(queue.Empty):
                    while len(batch) < 256:
                        batch.append(self._inbox.get_nowait())
            except queue.Empty:
                batch = []
            if self._handle(store, batch):
                return
            self._due(store)
            now = time.monotonic()
            if now >= next_beat:
                next_beat = now + BEAT_S
                self._beat(store)

    def _handle(self, store: SmsQueue, batch: list[dict[str, Any] | None]) -> bool:
        """Messages from the panel, events committed as one batch; True when it is time to stop."""
        owed: list[tuple[str, str, float]] = []
        fresh: list[Owed] = []
        mark: tuple[str, int] | None = None
        stop = False
        for message in batch:
            if message is None or message["type"] == "stop":
                stop = True
                break
            kind = message["type"]
            if kind == "event":
                mark = (message["boot"], message["n"])
                event = message["event"]
                if event.get("kind") == "reset":
                    self.policy.reset(event.get("device"))
                elif SmsPolicy.wanted(str(event.get("kind")), str(event.get("action"))):
                    key = delivery_key(event["kind"], event["action"], event.get("device"), event.get("code"),
                                       float(event["mono"]))
                    made = float(event.get("wall") or time.time())
                    owed.append((key, msgspec.json.encode(event).decode(), made))
                    fresh.append(self._owed(key, event, made))
            elif kind == "delivered":
                cancelled = self.policy.delivered(str(k) for k in message["keys"])
                if cancelled:
                    store.cancel(cancelled)
                    log.info("sms no longer owed: the broker acknowledged", events=len(cancelled))
            elif kind == "transmission":
                self.policy.transmission_fault = bool(message["present"])
            elif kind == "request":
                self._request(store, message)
        if owed or mark is not None:
            store.store(owed, None if mark is None else f"{mark[0]}:{mark[1]}")
            for item in fresh:
                self.policy.owe(item)
            if mark is not None:
                self._send("stored", boot=mark[0], upto=mark[1], dropped={})
        return stop

    def _due(self, store: SmsQueue) -> None:
        send, held = self.policy.due(time.time())
        if not self.policy.became_due:
            return
        bodies = {key: msgspec.json.decode(body) for key, body, _ in store.owed()}
        roles = {p.phone: p.role for people in (self.contacts.technicians, self.contacts.building_heads,
                                                *self.contacts.unit_heads.values(), *self.contacts.relatives.values())
                 for p in people}
        messages = []
        for item, state in [(s, "pending") for s in send] + [(h, "held") for h in held]:
            event = bodies.get(item.key)
            if event is None:
                continue
            text = event_text(event, building=self.sms.building, language=self.sms.language)
            messages.append((item.key, item.recipient, roles.get(item.recipient, "contact"), text, item.first, state))
        store.enqueue(self.policy.became_due, messages)  # those with no one to tell leave the owed list too
        for item in held:
            log.warning("sms held back: hourly cap reached", recipient=mask(item.recipient),
                        max_per_hour=self.sms.max_per_hour)
        if send:
            log.info("sms due", messages=len(send), recipients=sorted({mask(s.recipient) for s in send}))
            self._wake_modem.set()

    def _request(self, store: SmsQueue, message: dict[str, Any]) -> None:
        request_id, name, args = message["id"], message["name"], message["args"]

        def answer(data: dict[str, Any], ok: bool) -> None:
            self._send("reply", id=request_id, ok=ok, data=data)

        if name == "sms_status":
            answer({**self._figures, **store.figures(), "contacts": self.contacts.counts(),
                    "mode": self.sms.mode, "after_s": self.sms.after_s, "owed_now": self.policy.owed(),
                    "held_back_total": self.policy.held_back}, True)
        elif name == "sms_test":
            number = "".join(str(args.get("number", "")).split())
            if not number.lstrip("+").isdigit() or not 3 <= len(number.lstrip("+")) <= 20:
                answer({"error": "not a phone number"}, False)
                return
            text = technician_test_text(building=self.sms.building, language=self.sms.language)
            message_id = store.add_message(f"test:{time.time():.6f}", number, "test", text)
            with self._tests_lock:
                self._waiting_tests[message_id] = answer
            threading.Timer(TEST_WAIT_S, self._test_answer, (message_id, "queued", None)).start()
            log.info("test sms queued", recipient=mask(number))
            self._wake_modem.set()
        else:
            answer({"error": f"unknown request {name!r}"}, False)

    def _test_answer(self, message_id: int, state: str, error: str | None) -> None:
        with self._tests_lock:
            answer = self._waiting_tests.pop(message_id, None)
        if answer is not None:
            answer({"id": message_id, "state": state, "error": error}, state != "failed")

    def _beat(self, store: SmsQueue) -> None:
        figures = store.figures()
        self._send("beat", session=0, connected=self._fault is None, connections=0, last_error=self._fault,
                   stored=figures["sent"], held=figures["pending"])

    # ------------------------------------------------------------------------------ modem thread

    def _modem_loop(self) -> None:
        store = SmsQueue(self.sms.queue)
        next_check = 0.0
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                try:
                    if now >= next_check:
                        next_check = now + self.sms.check_interval_s
                        self._check_modem()
                    if self._send_next(store):
                        continue
                except Exception:  # this thread carries every message: a bug must not end it
                    log.exception("sms: modem step failed")
                    self._modem.close()
                retry_at = store.next_try_at()
                wait = next_check - time.monotonic()
                if retry_at is not None:
                    wait = min(wait, retry_at - time.time())
                self._wake_modem.wait(max(0.05, min(wait, 5.0)))
                self._wake_modem.clear()
        finally:
            self._modem.close()
            store.close()

    def _send_next(self, store: SmsQueue) -> bool:
        item = store.next_pending(time.time())
        if item is None:
            return False
        started = time.monotonic()
        try:
            refs = self._modem.send(item.recipient, item.text)
        except SendFailed as exc:
            if exc.refused:
                self._refused += 1
                if self._refused >= REFUSALS_FAULT:
                    self._refusal = f"SMS refused: {REFUSALS_FAULT} sends in a row; {exc}"
            delay = min(RETRY_MAX_S, RETRY_MIN_S * 2 ** min(item.attempts, 10))
            store.mark_retry(item.id, str(exc), delay)
            log.error("sms not sent; tried again later", recipient=mask(item.recipient), reason=str(exc),
                      retry_in_s=delay, attempt=item.attempts + 1)
            if item.role == "test":
                self._test_answer(item.id, "failed", str(exc))
            self._check_modem()
            return False
        store.mark_sent(item.id, len(refs))
        self.sent_total += 1
        self._refused = 0
        if self._refusal is not None:
            self._refusal = None
            self._set_fault(self._modem.health.problem)
        log.info("sms sent", recipient=mask(item.recipient), role=item.role, parts=len(refs),
                 ms=round((time.monotonic() - started) * 1000), what=":".join(item.key.split("|", 2)[:2]))
        if item.role == "test":
            self._test_answer(item.id, "sent", None)
        return True

    def _check_modem(self) -> None:
        problem = self._modem.check().problem
        if problem is not None:  # it explains the refusals (not registered: +CMS ERROR 331); count afresh after
            self._refused, self._refusal = 0, None
        self._set_fault(problem)

    def _set_fault(self, health_problem: str | None) -> None:
        """The ``modem`` fault: the modem's health problem, else sends refused in a row (status shows which)."""
        health = self._modem.health
        problem = health_problem or self._refusal
        self._figures = {"modem": {**health.as_dict(), "problem": problem, "refused_in_a_row": self._refused,
                                   "device": self.sms.device}}
        if problem != self._fault:
            if problem is not None:
                log.error("modem fault", detail=problem)
            elif self._fault is not None:
                log.info("modem fault cleared", operator=health.operator, signal_percent=health.signal_percent)
            if (problem is None) != (self._fault is None):
                self._send("fault", code=MODEM_FAULT, present=problem is not None, detail=problem)
            self._fault = problem


def main(argv: list[str] | None = None) -> int:
    """Entry point of the SMS process (started by the panel, never by hand)."""
    parser = argparse.ArgumentParser(prog="gatewayd-sms")
    parser.add_argument("--config", required=True)
    parser.add_argument("--link-fd", type=int, required=True)
    parser.add_argument("--log-level", default=os.environ.get("GATEWAY_LOG_LEVEL", "info"))
    args = parser.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    with contextlib.suppress(OSError, AttributeError):
        os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
    logger.configure(level=args.log_level, process="sms")
    try:
        settings = SmsSettings.from_environment(os.environ) or _settings_from_file(args.config)
    except SettingsError as exc:
        key, _, reason = str(exc).partition(": ")
        log.error("config error", key=key, reason=reason)
        return 78
    problem = None
    try:
        contacts = Contacts.load(settings.contacts, settings.community, settings.building)
    except ContactsError as exc:
        log.error("contacts unusable; no SMS can go to anyone", reason=str(exc))
        contacts, problem = Contacts(), str(exc)
    sock = socket.socket(fileno=args.link_fd)
    return SmsProcess(settings, sock, contacts, contacts_problem=problem).run()


def _settings_from_file(path: str) -> SmsSettings:
    """The settings read from the site file itself, when the panel passed none (started by hand)."""
    from gateway.config import ConfigError, load_config

    try:
        return SmsSettings.of(load_config(path))
    except ConfigError as exc:
        raise SettingsError(f"{exc.path}: {exc.reason}") from None


if __name__ == "__main__":
    sys.exit(main())
