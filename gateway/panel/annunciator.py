"""The annunciator owns the buzzer, the LEDs and the relays, and plays tone patterns in its own thread.

:meth:`Annunciator.show` is called directly by bus threads and GPIO callbacks (through the panel). When the
sounder's pattern changes it sets the buzzer to the pattern's first state *on the caller's thread* — the
pin goes high without a thread hop — and wakes the pattern thread, which keeps the timeline anchored to
that start. Nothing here touches the asyncio loop, the disk or the network.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from gateway.annunciation import Annunciation, Sound
from gateway.realtime import raise_priority

__all__ = ["CHIRP_S", "LED_PATTERNS", "PATTERNS", "Annunciator", "Output", "Pattern", "trouble_pattern"]

Step = tuple[bool, float]


@dataclass(frozen=True, slots=True)
class Pattern:
    """A timeline of (state, seconds) steps, repeated or played once."""

    name: str
    steps: tuple[Step, ...]
    repeat: bool = True

    @property
    def period(self) -> float:
        return sum(d for _, d in self.steps)

    def state_at(self, elapsed: float) -> tuple[bool, float]:
        """(state, seconds until the next change) at ``elapsed`` seconds after the start."""
        period = self.period
        if self.repeat:
            elapsed %= period
        elif elapsed >= period:
            return False, float("inf")
        t = 0.0
        for state, duration in self.steps:
            t += duration
            if elapsed < t:
                return state, t - elapsed
        return False, float("inf")


def _temporal(pulses: int, on: float, off: float, pause: float, name: str) -> Pattern:
    steps: list[Step] = []
    for i in range(pulses):
        steps += [(True, on), (False, pause if i == pulses - 1 else off)]
    return Pattern(name, tuple(steps))


#: Length of the trouble chirp.
CHIRP_S = 0.1


def trouble_pattern(interval_s: float = 45.0) -> Pattern:
    """One short chirp every ``interval_s`` seconds (``[alarm] trouble_chirp_interval_s``, 30–60 s)."""
    if interval_s <= CHIRP_S:
        raise ValueError(f"trouble chirp interval must exceed the {CHIRP_S} s chirp, got {interval_s}")
    return Pattern("trouble", ((True, CHIRP_S), (False, interval_s - CHIRP_S)))


#: Sounder patterns (docs/alarms.md). Gas/CO: Temporal-4, four 0.1 s pulses 0.1 s apart then 5 s off
#: (NFPA 720). Fire: Temporal-3, three 0.5 s pulses 0.5 s apart then 1.5 s off (ANSI/ASA S3.41).
#: Supervisory: a slow double beep every 5 s, unlike both. Test: quick 0.1 s beeps twice a second.
#: Trouble: one chirp every 45 s by default.
PATTERNS: dict[Sound, Pattern] = {
    Sound.GAS: _temporal(4, 0.1, 0.1, 5.0, "temporal-4"),
    Sound.FIRE: _temporal(3, 0.5, 0.5, 1.5, "temporal-3"),
    Sound.SUPERVISORY: Pattern("supervisory", ((True, 0.25), (False, 0.25), (True, 0.25), (False, 4.25))),
    Sound.TEST: Pattern("test", ((True, 0.1), (False, 0.4))),
    Sound.TROUBLE: trouble_pattern(),
}

#: LED patterns (GB 16808-2008): alarm red flashing 1 Hz; fault yellow 0.5 Hz (≥ 0.2 Hz); every flash on
#: 0.5 s (≥ 0.25 s). Supervisory has its own LED, flashing like the fault LED. Power is steady.
LED_PATTERNS: dict[str, Pattern] = {
    "alarm": Pattern("alarm-led", ((True, 0.5), (False, 0.5))),
    "supervisory": Pattern("supervisory-led", ((True, 0.5), (False, 1.5))),
    "fault": Pattern("fault-led", ((True, 0.5), (False, 1.5))),
    "power": Pattern("steady", ((True, 1.0),)),
}


class Output(Protocol):
    """What the annunciator needs of an output pin (gpiozero's OutputDevice fits)."""

    def on(self) -> None: ...
    def off(self) -> None: ...


class _Channel:
    """One output following one pattern from a start time."""

    __slots__ = ("output", "pattern", "start", "state")

    def __init__(self, output: Output) -> None:
        self.output = output
        self.pattern: Pattern | None = None
        self.start = 0.0
        self.state: bool | None = None

    def set(self, state: bool) -> None:
        if state != self.state:
            if state:
                self.output.on()
            else:
                self.output.off()
            self.state = state

    def follow(self, pattern: Pattern | None, now: float) -> None:
        self.pattern = pattern
        self.start = now
        self.update(now)

    def update(self, now: float) -> float:
        """Apply the state for ``now``; seconds until the next change."""
        if self.pattern is None:
            self.set(False)
            return float("inf")
        state, remaining = self.pattern.state_at(now - self.start)
        self.set(state)
        return remaining


class Annunciator:
    """Buzzer, LEDs and relays, driven from :class:`Annunciation` values."""

    def __init__(
        self,
        buzzer: Output,
        *,
        leds: Mapping[str, Output] | None = None,
        relays: Mapping[str, Output] | None = None,
        patterns: Mapping[Sound, Pattern] | None = None,
        heartbeat: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        realtime_priority: int = 0,
    ) -> None:
        self._priority = realtime_priority
        self._buzzer = _Channel(buzzer)
        self._leds = {name: _Channel(out) for name, out in (leds or {}).items()}
        self._relays = dict(relays or {})
        self._relay_state: dict[str, bool] = {}
        self._patterns: dict[Sound, Pattern] = {**PATTERNS, **(patterns or {})}
        self._heartbeat = heartbeat
        self._clock = clock
        self._lock = threading.Lock()  # guards channel state; held only while setting pins
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._current = Annunciation()
        self._override: tuple[Pattern, float] | None = None

    @property
    def current(self) -> Annunciation:
        """The annunciation being shown."""
        return self._current

    @property
    def sound_pattern(self) -> str | None:
        """Name of the sounder pattern playing now."""
        pattern = self._buzzer.pattern
        return pattern.name if pattern else None

    @property
    def buzzer_on(self) -> bool:
        """Whether the buzzer output is on at this instant."""
        return bool(self._buzzer.state)

    @property
    def relay_states(self) -> dict[str, bool]:
        """Relay id → on."""
        return dict(self._relay_state)

    def show(self, annunciation: Annunciation) -> None:
        """Show this state now; called from any thread. Never blocks on I/O other than the pins.

        A new sounder signal above TEST (an alarm or a supervisory signal) ends a buzzer test at once.
        """
        now = self._clock()
        with self._lock:
            previous = self._current
            self._current = annunciation
            if (self._override is not None and annunciation.sound != previous.sound
                    and annunciation.sound > Sound.TEST):
                self._override = None
            if self._override is None and (annunciation.sound != previous.sound or (self._buzzer.pattern is None
                                           and annunciation.sound != Sound.QUIET)):
                self._buzzer.follow(self._patterns.get(annunciation.sound), now)
            for name, channel in self._leds.items():
                wanted = self._led_pattern(name, annunciation)
                if wanted is not channel.pattern:
                    channel.follow(wanted, now)
            for relay_id, output in self._relays.items():
                on = relay_id in annunciation.relays
                if self._relay_state.get(relay_id) != on:
                    output.on() if on else output.off()
                    self._relay_state[relay_id] = on
        self._wake.set()

    def play(self, pattern: Pattern, seconds: float) -> None:
        """Play ``pattern`` on the sounder for ``seconds`` (buzzer test), then return to the current signal."""
        now = self._clock()
        with self._lock:
            self._override = (pattern, now + seconds)
            self._buzzer.follow(pattern, now)
        self._wake.set()

    def set_relay(self, relay_id: str, on: bool) -> None:
        """Drive a relay directly (relay test). The next :meth:`show` restores the linked state."""
        with self._lock:
            output = self._relays[relay_id]
            output.on() if on else output.off()
            self._relay_state[relay_id] = on

    def start(self) -> None:
        """Start the pattern thread."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="annunciator", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop the thread and switch the sounder and LEDs off."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        with self._lock:
            self._buzzer.follow(None, self._clock())
            for channel in self._leds.values():
                channel.follow(None, self._clock())

    @property
    def thread(self) -> threading.Thread | None:
        """The pattern thread (for raising its scheduling priority)."""
        return self._thread

    @staticmethod
    def _led_pattern(name: str, annunciation: Annunciation) -> Pattern | None:
        if name == "power":
            return LED_PATTERNS["power"]
        return LED_PATTERNS.get(name) if name in annunciation.leds else None

    def _run(self) -> None:
        raise_priority(self._priority, "annunciator")
        while not self._stop.is_set():
            self._wake.clear()
            now = self._clock()
            with self._lock:
                if self._override is not None and now >= self._override[1]:
                    self._override = None
                    self._buzzer.follow(self._patterns.get(self._current.sound), now)
                wait = self._buzzer.update(now)
                for channel in self._leds.values():
                    wait = min(wait, channel.update(now))
                if self._override is not None:
                    wait = min(wait, self._override[1] - now)
            if self._heartbeat is not None:
                self._heartbeat()
            self._wake.wait(timeout=max(0.0005, min(wait, 1.0)))
