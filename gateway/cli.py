"""``gatewayctl``: the technician's command line."""

from __future__ import annotations

import argparse
import sys

from gateway import __version__
from gateway.config import ConfigError, load_config

__all__ = ["main"]

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_UNAVAILABLE, EXIT_REJECTED = 0, 1, 2, 3, 4


def _config_check(path: str) -> int:
    try:
        cfg = load_config(path)
    except ConfigError as exc:
        print(f"gatewayctl: config error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    print(f"{path}: ok — {cfg.gateway_id}: {len(cfg.units)} units, {len(cfg.households)} households, "
          f"{len(cfg.devices)} devices, {len(cfg.buses)} buses")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``gatewayctl``."""
    parser = argparse.ArgumentParser(prog="gatewayctl", description="Building safety gateway: technician CLI")
    parser.add_argument("--version", action="version", version=f"gatewayctl {__version__}")
    parser.add_argument("--config", default="/etc/gateway/building.toml", help="site config (TOML)")
    sub = parser.add_subparsers(dest="command", required=True)
    config = sub.add_parser("config", help="check or show the site config")
    config_sub = config.add_subparsers(dest="action", required=True)
    check = config_sub.add_parser("check", help="validate a config file")
    check.add_argument("file")
    args = parser.parse_args(argv)
    if args.command == "config" and args.action == "check":
        return _config_check(args.file)
    parser.error(f"unknown command {args.command}")
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
