"""A simulated cellular modem on a pseudo-terminal, answering the AT commands Gammu's AT driver sends.

Gammu (through python-gammu) opens :attr:`SimulatedModem.port`, a symlink to the pty's slave side, exactly as
it opens a USB modem's ``/dev/ttyUSB2``. The simulator answers what libgammu/phone/at/atgen.c and at-sms.c
send: ``AT``, ``ATE1``, ``AT+CMEE=1``, identification (``AT+CGMI``/``CGMM``/``CGMR``/``CGSN``), ``AT+CPIN?``
and ``AT+CPIN="…"``, ``AT+CMGF=0`` (PDU mode), ``AT+CSCA?``, registration (``AT+CREG?``), the operator
(``AT+COPS?``), the signal (``AT+CSQ``), and ``AT+CMGS=<length>`` → ``> `` → the PDU in hex → Ctrl-Z →
``+CMGS: <reference>``. Anything else gets ``ERROR``, as a plain modem answers a command it lacks.

Each submitted PDU is recorded (:attr:`SimulatedModem.submitted`) as the bytes Gammu wrote; tests decode them
with Gammu's own decoder (:func:`decode_submitted`), never with the code under test.

Failures on command: :meth:`fail_next_sends` (``+CMS ERROR``), :attr:`registered` (no registration),
:attr:`sim` (``missing``/``locked``/``ready``), :attr:`csq` (99: no signal), :attr:`silent` (answers nothing),
:meth:`unplug`/:meth:`plug` (the port goes away and comes back).
For tests, the demo and benchmarks only: the Pi's install does not carry it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import threading
import time
import tty
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["SimulatedModem", "Submitted", "decode_submitted", "reassemble"]

#: The SMS centre number the simulated SIM holds.
SMSC = "+8613800100500"


@dataclass(frozen=True, slots=True)
class Submitted:
    """One ``AT+CMGS`` the modem accepted: the PDU as hex (SMSC part included), its TPDU length, when."""

    pdu_hex: str
    length: int
    at: float
    reference: int


class SimulatedModem:
    """One modem on a pty; ``with SimulatedModem(dir) as modem:`` starts and stops it."""

    def __init__(self, directory: str | os.PathLike[str], *, name: str = "ttyMODEM0", send_delay_s: float = 0.05,
                 manufacturer: str = "Quectel", model: str = "EC25", operator: str = "CHINA MOBILE") -> None:
        self._dir = Path(directory)
        self.port = str(self._dir / name)
        self.send_delay_s = send_delay_s
        """How long the simulated network takes to take an SMS (between Ctrl-Z and ``+CMGS``)."""
        self.manufacturer = manufacturer
        self.model = model
        self.operator = operator
        self.sim = "ready"  # ready | locked | missing
        self.pin = "1234"
        self.registered = True
        self.csq = 20  # 0–31, 99 unknown
        self.silent = False
        self.submitted: list[Submitted] = []
        self.commands: list[str] = []
        self._fail_sends = 0
        self._fail_code = 500
        self._reference = 0
        self._lock = threading.Lock()
        self._master = -1
        self._slave = -1
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._echo = True
        self._buffer = b""
        self._pdu_length: int | None = None
        self._reg_mode: dict[str, int] = {}
        self._cops_format = 0

    # ------------------------------------------------------------------------------ control

    def __enter__(self) -> SimulatedModem:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        """Create the pty and its symlink and start answering."""
        self._dir.mkdir(parents=True, exist_ok=True)
        self.plug()

    def stop(self) -> None:
        """Stop answering and remove the port."""
        self.unplug()

    def plug(self) -> None:
        """The modem appears (a new pty behind the same symlink)."""
        if self._thread is not None:
            return
        master, slave = os.openpty()
        tty.setraw(slave)
        os.set_blocking(master, False)
        self._master, self._slave = master, slave
        link = Path(self.port)
        with contextlib.suppress(FileNotFoundError):
            link.unlink()
        link.symlink_to(os.ttyname(slave))
        self._stop.clear()
        self._echo = True
        self._buffer = b""
        self._pdu_length = None
        self._thread = threading.Thread(target=self._run, name="simulated-modem", daemon=True)
        self._thread.start()

    def unplug(self) -> None:
        """The modem goes away: the symlink is removed and the pty closed (reads on it fail)."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._stop.set()
        thread.join(timeout=5)
        with contextlib.suppress(FileNotFoundError):
            Path(self.port).unlink()
        for fd in (self._master, self._slave):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._master = self._slave = -1

    def fail_next_sends(self, count: int = 1, code: int = 500) -> None:
        """The next ``count`` submissions are refused with ``+CMS ERROR: code``."""
        with self._lock:
            self._fail_sends, self._fail_code = count, code

    def submitted_pdus(self) -> list[Submitted]:
        """The PDUs accepted so far (a copy)."""
        with self._lock:
            return list(self.submitted)

    # ------------------------------------------------------------------------------ the line

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                ready, _, _ = select.select([self._master], [], [], 0.05)
            except (OSError, ValueError):
                return
            if not ready:
                continue
            try:
                data = os.read(self._master, 4096)
            except BlockingIOError:
                continue
            except OSError as exc:
                if exc.errno == errno.EIO:  # no one has the port open
                    time.sleep(0.02)
                    continue
                return
            if data:
                self._take(data)

    def _write(self, text: str | bytes) -> None:
        data = text.encode() if isinstance(text, str) else text
        while data:
            try:
                written = os.write(self._master, data)
            except BlockingIOError:
                time.sleep(0.005)
                continue
            except OSError:
                return
            data = data[written:]

    def _take(self, data: bytes) -> None:
        self._buffer += data
        while True:
            if self._pdu_length is not None:
                end = min((i for i in (self._buffer.find(b"\x1a"), self._buffer.find(b"\x1b")) if i >= 0),
                          default=-1)
                if end < 0:
                    return
                body, mark, self._buffer = self._buffer[:end], self._buffer[end:end + 1], self._buffer[end + 1:]
                length, self._pdu_length = self._pdu_length, None
                if mark == b"\x1a":
                    self._submit(body.decode("ascii", "replace").strip(), length)
                continue
            end = self._buffer.find(b"\r")
            if end < 0:
                return
            line, self._buffer = self._buffer[:end], self._buffer[end + 1:]
            text = line.decode("ascii", "replace").strip("\n ")
            if text:
                self._command(text)

    def _reply(self, *lines: str, final: str = "OK") -> None:
        out = "".join(f"\r\n{line}" for line in lines) + "\r\n" if lines else ""
        self._write(out + f"\r\n{final}\r\n")

    def _command(self, text: str) -> None:
        with self._lock:
            self.commands.append(text)
        if self.silent:
            return
        if self._echo:
            self._write(text + "\r")
        cmd = text.upper()
        if cmd in ("AT", "ATZ", "AT&F", "ATE0", "ATE1", "ATV1", "ATQ0") or cmd.startswith("AT+CMEE="):
            if cmd == "ATE0":
                self._echo = False
            elif cmd == "ATE1":
                self._echo = True
            self._reply()
        elif cmd == "AT+CGMI":
            self._reply(self.manufacturer)
        elif cmd == "AT+CGMM":
            self._reply(self.model)
        elif cmd == "AT+CGMR":
            self._reply("EC25ECGAR06A07M4G")
        elif cmd.startswith("AT+CFUN="):  # Gammu 1.42 (Debian's libGammu) powers the radio on at start
            self._reply()
        elif cmd == "AT+CFUN?":
            self._reply("+CFUN: 1")
        elif cmd in ("AT+CGSN", "AT+GSN"):
            self._reply("861234567890123")
        elif cmd == "AT+CPIN?":
            self._sim_reply()
        elif cmd.startswith("AT+CPIN="):
            given = text.split("=", 1)[1].strip('"')
            if self.sim == "missing":
                self._reply(final="+CME ERROR: 10")
            elif self.sim == "locked" and given == self.pin:
                self.sim = "ready"
                self._reply()
            elif self.sim == "locked":
                self._reply(final="+CME ERROR: 16")
            else:
                self._reply()
        elif cmd.startswith("AT+CMGF="):
            self._reply() if cmd.endswith("0") else self._reply(final="ERROR")
        elif cmd == "AT+CMGF?":
            self._reply("+CMGF: 0")
        elif cmd == "AT+CSCA?":
            if self._sim_ok():
                self._reply(f'+CSCA: "{SMSC}",145')
        elif cmd.startswith("AT+CSCA="):
            self._reply()
        elif cmd in ("AT+CREG?", "AT+CGREG?"):
            if self._sim_ok():
                name = cmd[2:-1]
                state = 1 if self.registered else 0
                if self._reg_mode.get(name, 0) == 2 and self.registered:
                    self._reply(f'{name}: 2,{state},"1A2B","01C3D4E5"')
                else:
                    self._reply(f"{name}: {self._reg_mode.get(name, 0)},{state}")
        elif cmd.startswith(("AT+CREG=", "AT+CGREG=")):
            name, _, mode = cmd[3:].partition("=")
            self._reg_mode["+" + name] = int(mode) if mode.isdigit() else 0
            self._reply()
        elif cmd == "AT+CGATT?":
            self._reply(f"+CGATT: {1 if self.registered else 0}")
        elif cmd == "AT+COPS?":
            if self._sim_ok():
                if not self.registered:
                    self._reply("+COPS: 0")
                elif self._cops_format == 2:
                    self._reply('+COPS: 0,2,"46000",7')
                else:
                    self._reply(f'+COPS: 0,0,"{self.operator}",7')
        elif cmd.startswith("AT+COPS=3,"):
            self._cops_format = int(cmd[-1]) if cmd[-1].isdigit() else 0
            self._reply()
        elif cmd == "AT+CSCS?":
            self._reply('+CSCS: "GSM"')
        elif cmd == "AT+CSCS=?":
            self._reply('+CSCS: ("GSM","IRA","UCS2")')
        elif cmd.startswith("AT+CSCS="):
            self._reply()
        elif cmd == "AT+CSQ":
            self._reply(f"+CSQ: {self.csq},99")
        elif cmd.startswith("AT+CMGS="):
            if not self._sim_ok():
                return
            try:
                self._pdu_length = int(cmd.split("=", 1)[1])
            except ValueError:
                self._reply(final="ERROR")
                return
            self._write("\r\n> ")
        else:
            self._reply(final="ERROR")

    def _sim_reply(self) -> None:
        if self.sim == "missing":
            self._reply(final="+CME ERROR: 10")
        elif self.sim == "locked":
            self._reply("+CPIN: SIM PIN")
        else:
            self._reply("+CPIN: READY")

    def _sim_ok(self) -> bool:
        if self.sim == "ready":
            return True
        self._reply(final="+CME ERROR: 10" if self.sim == "missing" else "+CME ERROR: 11")
        return False

    def _submit(self, pdu_hex: str, length: int) -> None:
        if self.send_delay_s:
            time.sleep(self.send_delay_s)
        with self._lock:
            if self._fail_sends:
                self._fail_sends -= 1
                code = self._fail_code
            else:
                code = 0
                self._reference = (self._reference + 1) % 256
                self.submitted.append(Submitted(pdu_hex, length, time.monotonic(), self._reference))
        if code:
            self._reply(final=f"+CMS ERROR: {code}")
        elif not self._sim_ok() or not self.registered:
            if self.sim == "ready":
                self._reply(final="+CMS ERROR: 331")  # no network service
        else:
            self._reply(f"+CMGS: {self._reference}")


def decode_submitted(item: Submitted) -> dict[str, Any]:
    """One recorded submission decoded by Gammu's own PDU decoder (``gammu.DecodePDU``)."""
    import gammu

    sms: dict[str, Any] = gammu.DecodePDU(bytes.fromhex(item.pdu_hex), SMSC=True)
    return sms


def reassemble(items: list[Submitted]) -> list[dict[str, Any]]:
    """Recorded submissions decoded and joined by Gammu (``gammu.LinkSMS`` and ``gammu.DecodeSMS``): one entry
    per message, with ``Number``, ``Text`` (the whole text) and ``Parts``."""
    import gammu

    decoded = [[decode_submitted(item)] for item in items]
    out = []
    for group in gammu.LinkSMS(decoded):
        info = gammu.DecodeSMS(group)
        if info is not None:
            text = "".join(str(entry.get("Buffer") or "") for entry in info["Entries"])
        else:
            text = "".join(str(part["Text"]) for part in group)
        out.append({"Number": group[0]["Number"], "Text": text, "Parts": len(group), "Unicode": info is not None and
                    info.get("Unicode", False)})
    return out
