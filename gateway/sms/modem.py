"""The cellular modem, through python-gammu (Gammu's AT driver: PDU mode, UCS-2, concatenated parts).

Nothing here encodes a PDU: :meth:`Modem.send` hands the text to ``gammu.EncodeSMS`` and each part to
``StateMachine.SendSMS``. Every call blocks (a serial line), so only the SMS process's modem thread calls it;
the panel never waits on it. :meth:`Modem.health` reads what a technician needs: the SIM, the registration,
the signal and the operator, and names the first problem found (the ``modem`` fault's detail).
"""

from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import asdict, dataclass
from typing import Any

from gateway.sms import logger

__all__ = ["Modem", "ModemHealth", "SendFailed", "encode_parts"]

log = logger.get_logger()

#: Longest start-up of Gammu's connection to the modem (a healthy one takes about 5 s: Gammu probes the model).
INIT_LIMIT_S = 20.0
#: Network states in which the modem can send.
REGISTERED = frozenset({"HomeNetwork", "RoamingNetwork"})


class SendFailed(Exception):
    """A message did not go; the text says why (never the number)."""


@dataclass(slots=True)
class ModemHealth:
    """What the modem said when last asked; ``problem`` is None when it can send."""

    problem: str | None
    sim: str | None = None  # ready | locked | missing
    registered: bool | None = None
    network: str | None = None
    operator: str | None = None
    signal_percent: int | None = None
    manufacturer: str | None = None
    model: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def encode_parts(text: str) -> list[dict[str, Any]]:
    """The text as Gammu's SMS parts: 7-bit GSM when it is plain ASCII, UCS-2 otherwise; several parts with a
    concatenation header when it is too long for one."""
    import gammu

    unicode = any(ord(c) > 127 for c in text)
    parts: list[dict[str, Any]] = gammu.EncodeSMS(
        {"Class": -1, "Unicode": unicode, "Entries": [{"ID": "ConcatenatedTextLong", "Buffer": text}]})
    return parts


class Modem:
    """One modem on a serial port, opened on first use and again after it was lost."""

    def __init__(self, device: str, *, connection: str = "at115200", pin: str | None = None,
                 smsc: str | None = None, debug_file: str | None = None) -> None:
        self.device = device
        self.connection = connection
        self._pin = pin
        self._pin_refused = False
        self._smsc = smsc
        self._debug_file = debug_file
        self._sm: Any = None
        self.health = ModemHealth(problem="not checked yet")

    def _open(self) -> Any:
        if self._sm is not None:
            return self._sm
        try:
            import gammu
        except ImportError as exc:  # an armhf system without libGammu's wheel (docs/deploy.md, "The modem")
            raise SendFailed(f"python-gammu unavailable: {exc}") from None

        if not os.path.exists(self.device):
            raise SendFailed(f"port lost: {self.device} is not there")
        sm = gammu.StateMachine()
        config = {"Device": self.device, "Connection": self.connection, "SyncTime": False, "LockDevice": False,
                  "StartInfo": False, "UseGlobalDebugFile": False}
        if self._debug_file:
            config.update(DebugFile=self._debug_file, DebugLevel="textall")
        sm.SetConfig(0, config)
        # A silent modem keeps Gammu's start-up trying command after command, each with its own timeout (minutes
        # in all): it is cut short from a timer thread (Gammu checks its abort flag while it waits).
        timer = threading.Timer(INIT_LIMIT_S, sm.Abort)
        timer.start()
        try:
            sm.Init()
        except gammu.GSMError as exc:
            with contextlib.suppress(Exception):
                sm.Terminate()
            raise SendFailed(f"modem not answering on {self.device}: {_reason(exc)}") from None
        finally:
            timer.cancel()
        self._sm = sm
        return sm

    def close(self, *, abort: bool = False) -> None:
        """Let go of the port (it is opened again on the next use). ``abort``: the modem does not answer, so
        Gammu's goodbye commands are cut short (each would wait its full timeout, tens of seconds)."""
        sm, self._sm = self._sm, None
        if sm is not None:
            try:
                if abort:
                    sm.Abort()
                sm.Terminate()
            except Exception as exc:  # a port already gone cannot be closed cleanly
                log.debug("modem close", error=repr(exc))

    def send(self, number: str, text: str) -> list[int]:
        """Send ``text`` to ``number`` (every part); the modem's message references. :class:`SendFailed`."""
        sm = self._open()  # first: SendFailed when python-gammu is missing
        import gammu

        try:
            refs = []
            for part in encode_parts(text):
                part["SMSC"] = {"Number": self._smsc} if self._smsc else {"Location": 1}
                part["Number"] = number
                refs.append(int(sm.SendSMS(part)))
            return refs
        except gammu.GSMError as exc:
            if _port_trouble(exc):
                self.close(abort=True)
            raise SendFailed(f"modem refused the message: {_reason(exc)}") from None

    def check(self) -> ModemHealth:
        """Ask the modem for the SIM, registration, signal and operator; the first problem found, if any."""
        try:
            import gammu
        except ImportError as exc:
            self.health = ModemHealth(problem=f"python-gammu unavailable: {exc}")
            return self.health
        health = ModemHealth(problem=None, manufacturer=self.health.manufacturer, model=self.health.model)
        try:
            sm = self._open()
            # The signal first: its command has Gammu's shortest timeout, so a modem gone silent is known soonest.
            signal = sm.GetSignalQuality()
            percent = int(signal.get("SignalPercent", -1))
            health.signal_percent = percent if percent >= 0 else None
            if health.manufacturer is None:
                health.manufacturer = str(sm.GetManufacturer())
                health.model = str(sm.GetModel()[1])
            health.sim = self._sim(sm)
            if health.sim != "ready":
                health.problem = "SIM missing" if health.sim == "missing" else "SIM locked (PIN needed)"
            else:
                net = sm.GetNetworkInfo()
                health.network = str(net.get("State"))
                health.registered = health.network in REGISTERED
                health.operator = str(net.get("NetworkName") or net.get("NetworkCode") or "") or None
                if not health.registered:
                    health.problem = f"not registered ({health.network})"
                elif not health.signal_percent:
                    health.problem = "no signal"
        except SendFailed as exc:
            health.problem = str(exc)
        except gammu.GSMError as exc:
            if _port_trouble(exc):
                self.close(abort=True)
                health.problem = f"modem not answering on {self.device}: {_reason(exc)}"
            elif type(exc).__name__ == "ERR_NOSIM":  # the SIM went after Gammu last read its state
                health.sim, health.problem = "missing", "SIM missing"
            elif type(exc).__name__ == "ERR_SECURITYERROR":
                health.sim, health.problem = "locked", "SIM locked (PIN needed)"
            else:
                health.problem = f"modem error: {_reason(exc)}"
        if not os.path.exists(self.device):
            self.close(abort=True)
            health.problem = f"port lost: {self.device} is not there"
        self.health = health
        return health

    def _sim(self, sm: Any) -> str:
        import gammu

        try:
            status = sm.GetSecurityStatus()
        except gammu.GSMError as exc:
            if "SIM" in _reason(exc).upper() or isinstance(exc, gammu.ERR_SECURITYERROR):
                return "missing"
            raise
        if status is None:
            return "ready"
        if status == "PIN" and self._pin and not self._pin_refused:
            try:
                sm.EnterSecurityCode("PIN", self._pin)
            except gammu.GSMError as exc:
                # Three wrong PINs lock the SIM for good (PUK): a refused PIN is never tried again by this process.
                self._pin_refused = True
                log.error("SIM PIN refused; not tried again until the SMS process restarts", reason=_reason(exc))
                return "locked"
            return "ready" if sm.GetSecurityStatus() is None else "locked"
        return "locked"


def _reason(exc: BaseException) -> str:
    info = exc.args[0] if exc.args and isinstance(exc.args[0], dict) else {}
    return f"{info.get('Text', exc)} ({type(exc).__name__})" if info else f"{type(exc).__name__}: {exc}"


def _port_trouble(exc: BaseException) -> bool:
    """Errors after which the port is opened afresh: it went away, or the modem stopped answering."""
    return type(exc).__name__ in {"ERR_DEVICEOPENERROR", "ERR_DEVICEREADERROR", "ERR_DEVICEWRITEERROR",
                                  "ERR_DEVICENOTEXIST", "ERR_TIMEOUT", "ERR_DEVICECHANGESPEEDERROR",
                                  "ERR_DEVICELOCKED", "ERR_DEVICEDTRRTSERROR", "ERR_NOTCONNECTED",
                                  "ERR_ABORTED"}
