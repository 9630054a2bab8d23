"""A real PgBouncer for the pooler tests: Debian's package, installed by the test
set-up when missing and apt can install it (otherwise the tests skip with the
reason), started by the tests on a free port with a generated configuration in a
temporary folder, in front of the test server."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from psycopg.conninfo import conninfo_to_dict, make_conninfo

from tests.debian import ensure_package
from tests.pgserver import free_port

PGBOUNCER = Path("/usr/sbin/pgbouncer")
UNPRIVILEGED = ("postgres", "nobody")  # PgBouncer refuses to run as root


def ensure_pgbouncer() -> str | None:
    """Install Debian's pgbouncer when missing; return why it cannot be had, or None."""
    return ensure_package(PGBOUNCER, "pgbouncer")


def _run_as() -> str | None:
    if os.geteuid() != 0:
        return None
    for name in UNPRIVILEGED:
        with contextlib.suppress(KeyError):
            pwd.getpwnam(name)
            return name
    raise RuntimeError("no unprivileged user to run pgbouncer as")


class PgBouncer:
    """PgBouncer in `pool_mode` (session or transaction) in front of the server of
    `server_url`; `url(db_url)` is db_url through it."""

    def __init__(self, server_url: str, pool_mode: str) -> None:
        params = conninfo_to_dict(server_url)
        host = str(params.get("host") or "127.0.0.1")
        port = int(params.get("port") or 5432)
        self.pool_mode = pool_mode
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="ai-jobs-pgbouncer-"))
        (self.dir / "users.txt").write_text('"postgres" ""\n')
        (self.dir / "pgbouncer.ini").write_text(
            "[databases]\n"
            f"* = host={host} port={port}\n"
            "[pgbouncer]\n"
            f"listen_addr = 127.0.0.1\nlisten_port = {self.port}\nunix_socket_dir =\n"
            f"auth_type = trust\nauth_file = {self.dir}/users.txt\n"
            f"pool_mode = {pool_mode}\n"
            "max_client_conn = 200\ndefault_pool_size = 20\n"
            # Several server connections, used in turn: what a busy pooler does to a
            # client that expects its session (its prepared statements) to stay.
            "min_pool_size = 3\nserver_round_robin = 1\n"
            "ignore_startup_parameters = extra_float_digits\n"
            f"logfile = {self.dir}/pgbouncer.log\npidfile = {self.dir}/pgbouncer.pid\n"
        )
        self.user = _run_as()
        if self.user:
            pw = pwd.getpwnam(self.user)
            for path in (self.dir, *self.dir.iterdir()):
                os.chown(path, pw.pw_uid, pw.pw_gid)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> PgBouncer:
        cmd = [str(PGBOUNCER), str(self.dir / "pgbouncer.ini")]
        if self.user:
            cmd = ["runuser", "-u", self.user, "--", *cmd]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", self.port), 1).close()
                return self
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"pgbouncer did not start: {self.log()[-2000:]}")
            time.sleep(0.05)

    def url(self, db_url: str) -> str:
        params = conninfo_to_dict(db_url)
        params.update(host="127.0.0.1", port=str(self.port), user="postgres")
        params.pop("password", None)
        return make_conninfo("", **params)

    def log(self) -> str:
        with contextlib.suppress(OSError):
            return (self.dir / "pgbouncer.log").read_text()
        return ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # immediate shutdown
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        shutil.rmtree(self.dir, ignore_errors=True)


if __name__ == "__main__":
    reason = ensure_pgbouncer()
    print(reason or f"{PGBOUNCER} ready")
    raise SystemExit(1 if reason else 0)
