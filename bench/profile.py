"""Where a worker's time goes: a pyinstrument wall-clock profile of the worker
process during a drain, folded into a few groups (waiting in the event loop's
select = on PostgreSQL round trips and commits; the driver; our code; asyncio;
logging; ...) and the functions with the most self time."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

GROUPS = (
    ("waiting on I/O (event loop idle in select)", ("selectors.py",)),
    ("psycopg / psycopg_pool (driver)", ("/psycopg/", "/psycopg_pool/", "psycopg_binary")),
    ("ai-jobs worker code (listener/)", ("/listener/",)),
    ("asyncio machinery", ("/asyncio/",)),
    ("logging (loguru)", ("/loguru/",)),
    ("json / uuid / pydantic", ("/json/", "uuid.py", "/pydantic")),
    ("benchmark harness (bench/)", ("/bench/",)),
)


def group_of(path: str, function: str = "") -> str:
    if function in ("epoll.poll", "select.epoll.poll", "poll"):
        return GROUPS[0][0]
    for name, needles in GROUPS:
        if any(n in path for n in needles):
            return name
    return "other Python"


def _walk(frame: Any, out: list[tuple[str, str, float]], parent: tuple[str, str]) -> None:
    here = (frame.file_path or "", frame.function or "")
    if frame.is_synthetic or not frame.file_path:
        here = parent  # pyinstrument's "[self]" leaves: time of the frame above
    children = list(frame.children)
    self_time = frame.time - sum(c.time for c in children)
    if self_time > 0:
        out.append((*here, self_time))
    for c in children:
        _walk(c, out, here)


def summarize(session: Any, profiler: Any = None) -> dict[str, Any]:
    root = session.root_frame()
    rows: list[tuple[str, str, float]] = []
    if root is not None:
        _walk(root, rows, ("", ""))
    total = sum(t for _, _, t in rows) or 1.0
    groups: dict[str, float] = defaultdict(float)
    funcs: dict[str, float] = defaultdict(float)
    for path, fn, t in rows:
        groups[group_of(path, fn)] += t
        short = "/".join(path.split("/")[-2:])
        funcs[f"{short}:{fn}"] += t
    top = sorted(funcs.items(), key=lambda kv: -kv[1])[:15]
    out: dict[str, Any] = {
        "wall_s": session.duration,
        "cpu_s": session.cpu_time,
        "sampled_s": total,
        "groups": {
            k: round(v / total, 4) for k, v in sorted(groups.items(), key=lambda kv: -kv[1])
        },
        "top_self": [{"function": k, "share": round(v / total, 4)} for k, v in top],
    }
    if profiler is not None:
        out["text"] = profiler.output_text(unicode=False, color=False, show_all=False)
    return out
