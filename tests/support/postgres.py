"""A private PostgreSQL server in a temp dir (initdb + pg_ctl), on a free port, its socket in the same dir."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType

from tests.support.broker import free_port

__all__ = ["PG_BIN_ENV", "PostgresServer", "find_pg_bin"]

_PG_BIN_DIRS = ("/usr/lib/postgresql/15/bin", "/usr/lib/postgresql/16/bin", "/usr/lib/postgresql/17/bin")
#: The directory holding initdb and pg_ctl; when set, the only place looked (an empty directory hides them).
PG_BIN_ENV = "GATEWAY_TEST_PG_BIN"


def find_pg_bin() -> Path | None:
    """The directory holding initdb and pg_ctl (``$GATEWAY_TEST_PG_BIN``, Debian's, or on PATH), or None."""
    chosen = os.environ.get(PG_BIN_ENV)
    if chosen is not None:
        return Path(chosen) if os.access(Path(chosen) / "initdb", os.X_OK) else None
    for d in _PG_BIN_DIRS:
        if os.access(Path(d) / "initdb", os.X_OK):
            return Path(d)
    found = shutil.which("initdb")
    return Path(found).parent if found else None


class PostgresServer:
    """initdb into ``workdir``, start with pg_ctl; ``dsn`` names the unix socket there. Never the system's server."""

    def __init__(self, workdir: str | os.PathLike[str] | None = None, *, database: str = "safety") -> None:
        # As root the server runs as the postgres user, which cannot enter pytest's 0700 temp dirs: a dir of
        # its own under the system temp dir then (removed at stop).
        self._own_dir = workdir is None or os.geteuid() == 0
        self.workdir = Path(tempfile.mkdtemp(prefix="fleet-pg-")) if self._own_dir else Path(workdir)  # type: ignore[arg-type]
        self.data = self.workdir / "data"
        self.socket_dir = self.workdir / "sock"
        self.port = free_port()
        self.database = database
        bin_dir = find_pg_bin()
        if bin_dir is None:
            raise RuntimeError("PostgreSQL server binaries are required: apt-get install postgresql")
        self.bin = bin_dir
        self._env = {**os.environ, "LC_ALL": "C", "LANG": "C"}

    @property
    def dsn(self) -> str:
        return f"host={self.socket_dir} port={self.port} dbname={self.database} user=postgres"

    def _run(self, *argv: str) -> None:
        cmd = list(argv)
        if os.geteuid() == 0:  # PostgreSQL refuses to run as root
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        subprocess.run(cmd, check=True, env=self._env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=120)

    def start(self) -> PostgresServer:
        self.socket_dir.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(self.workdir, "postgres")
            shutil.chown(self.socket_dir, "postgres")
        self._run(str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8",
                  "--no-sync")
        options = (f"-p {self.port} -k {self.socket_dir} -c listen_addresses='' -c fsync=on "
                   f"-c max_connections=50 -c shared_buffers=64MB")
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-o", options, "-l", str(self.workdir / "pg.log"),
                  "-w", "-t", "60", "start")
        self._run(str(self.bin / "createdb"), "-h", str(self.socket_dir), "-p", str(self.port), "-U", "postgres",
                  self.database)
        return self

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
