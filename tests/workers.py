"""Running workers for tests: in-process (for handler-level control) and as the
real `ai-jobs worker` subprocess (for anything where a process matters)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from listener import db
from listener.jobs import HandlerMap
from listener.settings import Settings
from listener.worker import Worker
from tests.helpers import AI_JOBS, env

FAST = {
    "sweep_interval_seconds": 3600,
    "heartbeat_interval_seconds": 0.5,
    "retry_base_seconds": 0.2,
}


def settings(db_url: str, **overrides: Any) -> Settings:
    values = {"database_url": db_url, "storage_url": tempfile.mkdtemp(), **FAST, **overrides}
    return Settings(**values)


@contextlib.asynccontextmanager
async def running_worker(
    s: Settings, handlers: HandlerMap, *, listen: bool = True, **worker_args: Any
) -> AsyncIterator[Worker]:
    pool = db.make_pool(s.dsn or "", 5)
    await pool.open()
    worker = Worker(s, pool, handlers, listen=listen, **worker_args)
    task = asyncio.create_task(worker.run())
    try:
        if listen:
            await asyncio.wait_for(worker.listener.connected.wait(), 10)
        yield worker
    finally:
        worker.request_stop()
        await asyncio.wait_for(task, 30)
        await pool.close()


class WorkerProcess:
    """The real `ai-jobs worker` in a subprocess, logging JSON lines to a file."""

    def __init__(self, db_url: str, **settings_env: Any) -> None:
        self.log_path = Path(tempfile.mkstemp(prefix="worker-", suffix=".log")[1])
        base = {
            "LOG_FORMAT": "json",
            "ALLOW_PLACEHOLDER": "1",
            "STORAGE_URL": tempfile.mkdtemp(),
            "SWEEP_INTERVAL_SECONDS": "3600",
        }
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in wait()
        self.proc = subprocess.Popen(
            [*AI_JOBS, "worker"],
            env=env(db_url, **{**base, **settings_env}),
            stdout=subprocess.DEVNULL,
            stderr=self._log,
            text=True,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def events(self) -> list[dict[str, Any]]:
        # The whole lines alone: the worker may be midway through writing one, its
        # last bytes cut inside a character.
        data = self.log_path.read_bytes()
        out = []
        for line in data[: data.rfind(b"\n") + 1].decode().splitlines():
            with contextlib.suppress(ValueError):
                rec = json.loads(line)["record"]
                out.append(
                    {
                        "message": rec["message"],
                        "level": rec["level"]["name"],
                        "ts": rec["time"]["timestamp"],
                        **rec["extra"],
                    }
                )
        return out

    def actions(self, action: str) -> list[dict[str, Any]]:
        return [e for e in self.events() if e.get("action") == action]

    def wait_for(
        self,
        action: str,
        where: Callable[[dict[str, Any]], bool] = lambda e: True,
        timeout: float = 20,
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [e for e in self.actions(action) if where(e)]
            if found:
                return found[0]
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited {self.proc.returncode}:\n{self.log()}")
            time.sleep(0.02)
        raise AssertionError(f"no {action!r} within {timeout}s:\n{self.log()[-4000:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")  # perhaps cut inside a character

    def started(self) -> WorkerProcess:
        """Wait for the worker's start; if it never comes, kill it before failing,
        so that no process outlives the test that started it. The wait is long
        (it ends with the start): a busy machine running the slow tests three
        at a time has taken over 20 s to import and connect."""
        try:
            self.wait_for("worker_started", timeout=40)
        except BaseException:
            self.stop()
            raise
        return self

    def signal(self, sig: signal.Signals) -> None:
        os.kill(self.proc.pid, sig)

    def wait(self, timeout: float = 30) -> int:
        code = self.proc.wait(timeout)
        self._log.close()
        return code

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.wait()
