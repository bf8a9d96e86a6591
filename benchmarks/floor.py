"""The platform's floor for the serial alarm path: the least a process can do between a frame and a pin.

One thread blocked in ``read()`` on its own pseudo-terminal, fed by the same simulated cable as the
gateway's port (:mod:`simbus`), drives a gpiozero mock pin high as soon as the read returns, then low, and
prints the moment the pin went high (``time.perf_counter()``: CLOCK_MONOTONIC, comparable across
processes). No decoding, no second thread, no tuning of the interpreter: what is left between the cable and
the pin is the kernel waking a thread and the interpreter running a few lines. ``buzzer_latency.py``
subtracts it from the gateway's figure, trial by trial under the same stress.

    python benchmarks/floor.py PORT [PRIORITY]

``PRIORITY`` > 0 puts the thread in SCHED_FIFO at that priority (as the gateway's alarm threads), when
permitted; the first line printed says which scheduling it got.
"""

from __future__ import annotations

import os
import sys
import time
import tty

from gpiozero import DigitalOutputDevice
from gpiozero.pins.mock import MockFactory, MockPin


class StampedPin(MockPin):  # type: ignore[misc]
    """A mock pin that keeps the moment it last went high."""

    high_at = 0.0

    def _change_state(self, value: bool) -> bool:
        changed = bool(super()._change_state(value))
        if changed and value:
            self.high_at = time.perf_counter()
        return changed


def main(argv: list[str]) -> int:
    port, priority = argv[0], int(argv[1]) if len(argv) > 1 else 0
    scheduling = "normal"
    if priority > 0:
        try:
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(priority))
            scheduling = f"fifo:{priority}"
        except (AttributeError, PermissionError, OSError):
            pass
    factory = MockFactory(pin_class=StampedPin)
    pin = DigitalOutputDevice(18, pin_factory=factory)
    stamped = factory.pin(18)
    fd = os.open(port, os.O_RDWR | os.O_NOCTTY)
    tty.setraw(fd)
    print(scheduling, flush=True)
    while os.read(fd, 256):  # one answer frame arrives in one write of the cable
        pin.on()
        pin.off()
        print(repr(stamped.high_at), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
