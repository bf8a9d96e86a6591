"""``gatewayd``: the building's alarm panel, which runs its storage/uplink process beside it.

Data flows one way: drivers → panel core (→ annunciator, at once) → hand-over → storage process (outbox,
SQLite) → uplink (MQTT). The panel (:mod:`gateway.panel.process`) is this process; it starts the storage
process (:mod:`gateway.uplink.process`) and keeps it running. docs/architecture.md draws both.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Mapping
from pathlib import Path

import structlog

from gateway import __version__
from gateway.config import EX_CONFIG, ConfigError, SiteConfig, bus_floor_warnings, load_config
from gateway.logs import configure_logging
from gateway.notify import Notifier
from gateway.panel.children import FirstChild, can_fork, panel_children
from gateway.realtime import raise_priority

__all__ = ["main", "run_panel"]

log = structlog.get_logger()


def run_panel(cfg: SiteConfig, config_path: str, *, duration: float | None = None,
              first_children: Mapping[str, FirstChild] | None = None) -> int:
    """Open the panel and serve until stopped; the exit status (a sysexits code when it cannot start)."""
    # Imported here, after the first children were forked: the panel's own modules (gpiozero, pymodbus, the
    # panel) are not in them, which never use them.
    from gateway.panel.process import PanelProcess, PanelStartError

    for warning in bus_floor_warnings(cfg):
        log.warning("poll interval cannot be met on the wire", detail=warning)
    panel = PanelProcess(cfg, config_path, first_children=first_children)
    try:
        panel.open()
    except PanelStartError as exc:
        _start_failed(exc.line)
        log.error("the panel cannot start", reason=exc.line, exit_code=exc.code)
        log.debug("start failure", exc_info=exc.__cause__ or exc)
        return exc.code
    return asyncio.run(panel.serve(duration=duration))


def _start_failed(line: str) -> None:
    """Why the panel cannot start, in one line: on stderr (the journal) and as the unit's ``STATUS=``, which
    ``systemctl status`` keeps showing while the unit waits to restart or has failed (the journal lines of an
    earlier start are not there)."""
    print(f"gatewayd: {line}", file=sys.stderr)
    Notifier().status(f"cannot start: {line}")


def _refuse_unedited(config: str, example: str | None) -> None:
    """A :class:`ConfigError` when ``config`` is still the shipped ``example`` unchanged: its contacts are not
    wired and it would publish as the example building."""
    if example is None:
        return
    try:
        unedited = Path(config).read_bytes() == Path(example).read_bytes()
    except OSError:
        return  # a missing site file is load_config's to report; a missing example refuses nothing
    if unedited:
        raise ConfigError("site", f"{config} is still the shipped example, unchanged: edit it for this building "
                                  "(docs/deploy.md), check it with `gatewayctl doctor`, then start the service")


def _demo(duration: float) -> int:
    """``--demo``: the simulated building of :mod:`gateway_sim`, which a source checkout carries and a building's
    install does not (one line and EX_CONFIG there, not a traceback)."""
    checkout = Path(__file__).resolve().parent.parent
    if (checkout / "gateway_sim").is_dir() and str(checkout) not in sys.path:
        sys.path.append(str(checkout))  # an editable install maps gateway/ and drivers/ only
    try:
        from gateway_sim.demo import run_demo
    except ModuleNotFoundError as exc:
        if exc.name != "gateway_sim":
            raise
        print("gatewayd: --demo: the simulator (gateway_sim) is not installed: a building's install does not carry "
              "it; run scripts/demo in a source checkout", file=sys.stderr)
        return EX_CONFIG
    return run_demo(duration=duration)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``gatewayd``."""
    parser = argparse.ArgumentParser(prog="gatewayd", description="Building safety gateway daemon")
    parser.add_argument("--config", default="/etc/gateway/building.toml", help="site config (TOML)")
    parser.add_argument("--demo", action="store_true", help="run a simulated building and play a gas leak")
    parser.add_argument("--duration", type=float, default=None, help="stop after this many seconds")
    parser.add_argument("--unedited-example", metavar="PATH",
                        help="refuse to start while the site file is still this shipped example, byte for byte")
    parser.add_argument("--log-level", default="info")
    parser.add_argument("--version", action="version", version=f"gatewayd {__version__}")
    args = parser.parse_args(argv)
    configure_logging(level=args.log_level)
    if args.demo:
        return _demo(args.duration or 30.0)
    try:
        _refuse_unedited(args.config, args.unedited_example)
        cfg = load_config(args.config)
    except ConfigError as exc:
        lines = exc.lines()
        _start_failed(f"config error: {lines[0]}" + (f" (and {len(lines) - 1} more below)" if len(lines) > 1 else ""))
        for line in lines[1:]:
            print(f"gatewayd: config error: {line}", file=sys.stderr)
        log.error("config error", key=exc.path, reason=exc.reason, line=exc.line,
                  errors=len(getattr(exc, "errors", [exc])))
        return EX_CONFIG
    first_children = _fork_children(cfg, args.config)
    raise_priority(0, "main")
    return run_panel(cfg, args.config, duration=args.duration, first_children=first_children)


def _fork_children(cfg: SiteConfig, config_path: str) -> dict[str, FirstChild]:
    """The storage and SMS processes, forked now, before any thread, port or pin (gateway/panel/children.py); none
    when this process runs threads already (they then start as new interpreters)."""
    if not can_fork():
        log.warning("threads run already: the panel's children start as new interpreters")
        return {}
    forked: dict[str, FirstChild] = {}
    for child in panel_children(cfg):
        try:
            forked[child.name] = child.fork_first(config_path)
        except OSError as exc:  # no fork (a process limit): its supervisor starts it as a new interpreter
            log.warning("could not fork the child; it starts as a new interpreter", child=child.name, error=str(exc))
    return forked


if __name__ == "__main__":
    sys.exit(main())
