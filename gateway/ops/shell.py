"""Shell completion (bash, zsh) and the man page of ``gatewayctl``, generated from its argument parser so that
neither drifts from the commands: ``python -m gateway.ops.shell completion bash|zsh`` and
``python -m gateway.ops.shell man``. scripts/install.sh puts them in place; shtab writes the completion
scripts and argparse-manpage the page.
"""

from __future__ import annotations

import argparse
import sys

from gateway import __version__
from gateway.ops.cli import build_parser

__all__ = ["SHELLS", "completion", "main", "manpage"]

SHELLS = ("bash", "zsh")


def completion(shell: str) -> str:
    """The completion script of ``gatewayctl`` for ``shell`` (bash or zsh)."""
    import shtab

    return str(shtab.complete(build_parser(), shell=shell))


def manpage() -> str:
    """``gatewayctl(1)`` in roff."""
    from argparse_manpage.manpage import Manpage

    data = {"project_name": "building-safety-gateway", "version": __version__, "manual_section": "1",
            "manual_title": "Building safety gateway", "description": "technician's command line of the gateway",
            "url": "docs/cli.md in the source"}
    return str(Manpage(build_parser(), _data=data, format="single-commands-section"))


def main(argv: list[str] | None = None) -> int:
    """``python -m gateway.ops.shell completion bash|zsh`` or ``... man``: write it to stdout."""
    parser = argparse.ArgumentParser(prog="python -m gateway.ops.shell", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    sub.add_parser("completion", help="a completion script").add_argument("shell", choices=SHELLS)
    sub.add_parser("man", help="the man page gatewayctl(1)")
    args = parser.parse_args(argv)
    sys.stdout.write(completion(args.shell) if args.what == "completion" else manpage())
    return 0


if __name__ == "__main__":
    sys.exit(main())
