"""The processes of a run: the fake provider, the workers under test (ai-jobs of
this checkout or of an earlier one, or pgqueuer), and what /proc says of them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import httpx

from bench.proc import ROOT as ROOT

TICKS = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


class Fake:
    """`python -m tests.fakeai` as its own process (its threads never share a core's
    time slices with a worker's event loop)."""

    def __init__(self, args: list[str], log: Path) -> None:
        self.log = log.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.fakeai", *args],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
        )
        assert self.proc.stdout is not None
        self.url = self.proc.stdout.readline().strip()
        if not self.url.startswith("http"):
            raise RuntimeError(f"the fake did not start (see {log})")
        self.http = httpx.Client(base_url=self.url, timeout=10)

    def stats(self) -> dict[str, Any]:
        return dict(self.http.get("/_fake/stats").json())

    def stop(self) -> dict[str, Any]:
        self.http.close()
        self.proc.send_signal(signal.SIGTERM)
        out, _ = self.proc.communicate(timeout=30)
        self.log.close()
        lines = [ln for ln in out.splitlines() if ln.startswith("{")]
        return dict(json.loads(lines[-1])) if lines else {}


def usage(pid: int) -> tuple[float, float]:
    """(CPU seconds so far, RSS in MB) of a live process; (0, 0) once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        rss_pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0.0, 0.0
    fields = stat.rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime
    return cpu, rss_pages * PAGE / 1e6


@dataclass
class Workers:
    """Worker processes of one system, started together, stopped together."""

    procs: list[subprocess.Popen[str]] = field(default_factory=list)
    logs: list[IO[str]] = field(default_factory=list)
    cpu0: list[float] = field(default_factory=list)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def start_cpu(self) -> None:
        self.cpu0 = [usage(pid)[0] for pid in self.pids]

    def sample(self) -> tuple[float, float]:
        """(CPU seconds since start_cpu, the largest RSS in MB) over the workers."""
        got = [usage(pid) for pid in self.pids]
        cpu = sum(c for c, _ in got) - sum(self.cpu0)
        return cpu, max((r for _, r in got), default=0.0)

    def check_alive(self) -> None:
        for p in self.procs:
            if p.poll() is not None:
                raise RuntimeError(f"a worker exited with {p.returncode}: see {self.logs[0].name}")

    def stop(self, timeout: float = 30) -> None:
        for p in self.procs:
            if p.poll() is None:
                if p.stdin is not None:
                    try:
                        p.stdin.write("stop\n")
                        p.stdin.flush()
                    except OSError:
                        pass
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for p in self.procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for f in self.logs:
            f.close()


def ai_jobs_env(url: str, fake: str, extra: dict[str, str]) -> dict[str, str]:
    from tests.fakeai import FAKE_OPENAI_KEY

    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI", "ANTHROPIC"))}
    env.update(
        DATABASE_URL=url,
        OPENAI_API_KEY=FAKE_OPENAI_KEY,
        OPENAI_BASE_URL=f"{fake}/v1",
        AI_PROVIDER_PRIORITY="openai",
        LOG_LEVEL="WARNING",
        CACHE_TTL_SECONDS="0",
        PYTHONPATH="",
    )
    env.pop("PROVIDER_LIMITS", None)
    env.update(extra)
    return env


def migrate(checkout: Path, url: str) -> None:
    env = {**os.environ, "DATABASE_URL": url, "PYTHONPATH": ""}
    subprocess.run(
        [sys.executable, "-m", "listener", "migrate"],
        cwd=checkout,
        env=env,
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def start_ai_jobs(checkout: Path, n: int, env: dict[str, str], logdir: Path) -> Workers:
    """`python -m listener worker`, run from `checkout` (so its own `listener`
    package is the one imported)."""
    w = Workers()
    for i in range(n):
        log = (logdir / f"worker{i}.log").open("w")
        w.logs.append(log)
        w.procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "listener", "worker"],
                cwd=checkout,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    return w


def start_pgqueuer(n: int, args: list[str], records: Path, logdir: Path) -> Workers:
    w = Workers()
    for i in range(n):
        log = (logdir / f"pgq{i}.log").open("w")
        w.logs.append(log)
        p = subprocess.Popen(
            [sys.executable, "-m", "bench.ai.pgq_worker", *args, "--records", str(records)],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
        )
        w.procs.append(p)
    for p in w.procs:
        assert p.stdout is not None
        if p.stdout.readline().strip() != "ready":
            w.stop()
            raise RuntimeError(f"pgqueuer worker did not start: see {logdir}")
    return w


def base_checkout(rev: str) -> Path:
    """A copy of this repository at `rev` (git archive), kept between runs."""
    sha = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--verify", f"{rev}^{{commit}}"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    where = Path(tempfile.gettempdir()) / f"ai-jobs-bench-base-{sha[:12]}"
    if not (where / "listener" / "worker.py").is_file():
        where.mkdir(parents=True, exist_ok=True)
        archive = subprocess.Popen(["git", "-C", str(ROOT), "archive", sha], stdout=subprocess.PIPE)
        subprocess.run(["tar", "-x", "-C", str(where)], stdin=archive.stdout, check=True)
        archive.wait()
    return where
