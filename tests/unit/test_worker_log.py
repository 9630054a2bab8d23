"""The tests' reader of a worker's JSON log, read while the worker writes it."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

from tests.workers import WorkerProcess


def _line(message: str) -> bytes:
    record = {"message": message, "level": {"name": "INFO"}, "time": {"timestamp": 1.0}}
    line = {"record": {**record, "extra": {"action": "bad_payload"}}}
    return json.dumps(line, ensure_ascii=False).encode()  # as loguru writes it


def test_a_line_cut_inside_a_character_is_left_for_the_next_read(tmp_path: Path) -> None:
    log = tmp_path / "worker.log"
    whole, cut = _line("payload é"), _line("payload " + "é" * 20)
    # As a reader may find it: the second line written up to the middle of an "é".
    log.write_bytes(whole + b"\n" + cut[: cut.index("é".encode()) + 1])
    worker: WorkerProcess = SimpleNamespace(log_path=log)  # type: ignore[assignment]
    assert [e["message"] for e in WorkerProcess.events(worker)] == ["payload é"]
    assert WorkerProcess.log(worker).startswith(whole.decode())
