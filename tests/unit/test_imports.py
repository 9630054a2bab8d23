"""The package's import graph: no cycles, counting the imports made inside
functions (a lazy import that closes a cycle hides it, it does not remove it);
imports for type checking only do not count. And what a start imports: no SDK
it does not use."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import listener

ROOT = Path(listener.__file__).parent


def _modules() -> dict[str, Path]:
    found = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    typing_only = {
        id(n)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for n in ast.walk(node)
    }
    out: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("listener"):
            assert node.module is not None
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                out.add(full if full in modules else node.module)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("listener")}
    return out


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, modules) for name, path in modules.items()}


def test_the_package_has_no_import_cycles() -> None:
    assert _cycles(_graph()) == []


def test_the_cycle_check_finds_a_cycle() -> None:
    graph = _graph()
    graph["listener.db"] = graph["listener.db"] | {"listener.medic"}  # as when db held the medic
    assert ["listener.db", "listener.medic"] in _cycles(graph)


def test_the_connection_module_imports_only_the_errors() -> None:
    assert _graph()["listener.db"] <= {"listener.errors"}


def test_a_start_imports_no_sdk_it_does_not_use() -> None:
    """Sentry's SDK without SENTRY_DSN; Anthropic's before its first call (both
    keys set): together 4 s of CPU of every worker's start on a 2-core machine."""
    code = (
        "import asyncio, sys\n"
        "from listener import app, cli, db, settings, telemetry, worker\n"
        "from listener.batches import setup as setup_batches\n"
        "from listener.handlers import create_runtime\n"
        "s = settings.Settings(openai_api_key='sk-test', anthropic_api_key='sk-ant-test',\n"
        "                      ai_provider_priority='openai,anthropic')\n"
        "assert telemetry.init_sentry(s) is False\n"
        "telemetry.flush()\n"
        "async def main():\n"
        "    pool = db.make_pool('postgresql://127.0.0.1:1/none', 2)  # never opened\n"
        "    rt = await create_runtime(s, pool, announce=False, start=False)\n"
        "    setup_batches(s, pool, rt)  # as a worker starts: its batch queues too\n"
        "    assert {p.name for p in rt.providers.course} == {'openai', 'anthropic'}\n"
        "    await rt.aclose()\n"
        "asyncio.run(main())\n"
        "loaded = [m for m in sys.modules if m.startswith(('sentry', 'anthropic'))]\n"
        "assert not loaded, loaded[:5]\n"
        "print('ok')\n"
    )
    environ = {
        k: v
        for k, v in os.environ.items()
        if k != "SENTRY_DSN" and not k.startswith(("OPENAI", "ANTHROPIC"))
    }
    out = subprocess.run(
        [sys.executable, "-c", code], env=environ, capture_output=True, text=True, timeout=60
    )
    assert out.stdout.strip() == "ok", out.stderr
