"""A worker process under test, seen from the load generator: start it, wait until
it is ready, tell it to go, read what it says, stop it, collect its timestamps."""

from __future__ import annotations

import json
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


class WorkerProcess:
    def __init__(
        self,
        system: str,
        url: str,
        mode: str,
        *,
        concurrency: int = 10,
        expect: int = 0,
        profile: Path | None = None,
        storage: Path | None = None,
    ) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="ai-jobs-bench-"))
        self.out = self.tmp / "result.json"
        cmd = [
            sys.executable, "-m", "bench.child", system,
            "--url", url, "--mode", mode,
            "--concurrency", str(concurrency), "--expect", str(expect),
            "--out", str(self.out),
        ]  # fmt: skip
        if profile:
            cmd += ["--profile", str(profile)]
        if storage:
            cmd += ["--storage", str(storage)]
        self.stderr = open(self.tmp / "stderr.log", "w+b")  # noqa: SIM115 (kept open while it runs)
        self.proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            text=True,
            bufsize=1,
        )
        self.lines: queue.Queue[tuple[str, float]] = queue.Queue()
        self.started = 0
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put((line.strip(), time.time()))
        self.lines.put(("<eof>", time.time()))

    def expect_line(self, word: str, timeout: float) -> float:
        """Wait for `word` (counting the "s" lines met on the way); its arrival time."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"worker did not say {word!r} in {timeout:g}s{self._err()}")
            try:
                got, at = self.lines.get(timeout=left)
            except queue.Empty:
                continue
            if got == "s":
                self.started += 1
                if word == "s":
                    return at
                continue
            if got == word:
                return at
            if got == "<eof>":
                raise RuntimeError(f"worker exited before saying {word!r}{self._err()}")

    def wait_started(self, n: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.started < n:
            self.expect_line("s", max(0.01, deadline - time.monotonic()))

    def send(self, word: str) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(word + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass

    def stop(self, timeout: float = 60) -> dict[str, Any]:
        self.send("stop")
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise RuntimeError(f"worker did not stop in {timeout:g}s{self._err()}") from None
        if self.proc.returncode != 0:
            raise RuntimeError(f"worker exited {self.proc.returncode}{self._err()}")
        return dict(json.loads(self.out.read_text()))

    def close(self) -> None:
        """Kill it if still running and remove its scratch folder."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.stderr.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def _err(self) -> str:
        self.stderr.flush()
        self.stderr.seek(0)
        tail = self.stderr.read().decode(errors="replace").strip().splitlines()[-15:]
        return (":\n  " + "\n  ".join(tail)) if tail else ""


def cpu_seconds(pid: int) -> float:
    """A process's user + system CPU time so far (/proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    """A process's resident memory, MiB (/proc)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0
