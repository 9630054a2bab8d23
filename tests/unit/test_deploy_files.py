"""The files the platforms read (Procfile, render.yaml, fly.toml, Dockerfile,
requirements.txt, .python-version) checked against the settings and the
commands, and the docs' references to files of the repository."""

from __future__ import annotations

import posixpath
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.version import Version

from listener.cli import build_parser
from listener.settings import Settings
from tests.helpers import ROOT

GRACE = Settings.model_fields["shutdown_grace_seconds"].default
# Variables the platforms read themselves, not ai-jobs settings.
PLATFORM_VARIABLES = {"PYTHON_VERSION"}


def _command(line: str) -> None:
    """An ai-jobs command line that the real parser accepts."""
    words = shlex.split(line)
    assert words[0] == "ai-jobs", line
    build_parser().parse_args(words[1:])  # SystemExit(2) on a bad command


def _setting(name: str) -> None:
    assert name in PLATFORM_VARIABLES or name.lower() in Settings.model_fields, (
        f"{name} is not a setting of listener/settings.py"
    )


def _procfile() -> dict[str, str]:
    lines = (ROOT / "Procfile").read_text().splitlines()
    return dict(line.split(": ", 1) for line in lines if line.strip())


def test_procfile_runs_migrate_worker_and_web() -> None:
    procs = _procfile()
    assert procs == {
        "release": "ai-jobs migrate",
        "worker": "ai-jobs worker",
        "web": "ai-jobs web",
    }
    for line in procs.values():
        _command(line)


def test_render_blueprint() -> None:
    spec: dict[str, Any] = yaml.safe_load((ROOT / "render.yaml").read_text())
    services = {s["type"]: s for s in spec["services"]}
    worker, web = services["worker"], services["web"]
    assert worker["startCommand"] == "ai-jobs worker"
    assert web["startCommand"] == "ai-jobs web"
    assert web["healthCheckPath"] == "/healthz"
    for s in (worker, web):
        assert s["runtime"] == "python"
        assert "requirements.txt" in s["buildCommand"]
        _command(s["startCommand"])
        # Each service migrates before it goes live: they deploy independently,
        # and the web service's first deploy may come first (the dashboard
        # refuses an unmigrated database). Two migrates at once are safe.
        assert s.get("preDeployCommand") == "ai-jobs migrate", s["name"]
        _command(s["preDeployCommand"])
    env = {v["key"]: v for g in spec["envVarGroups"] for v in g["envVars"]}
    for s in (worker, web):
        env |= {v["key"]: v for v in s["envVars"] if "key" in v}
    for name in env:
        _setting(name)
    grace = float(env.get("SHUTDOWN_GRACE_SECONDS", {}).get("value", GRACE))
    assert 1 <= worker["maxShutdownDelaySeconds"] <= 300
    assert worker["maxShutdownDelaySeconds"] > grace, "Render would kill the worker mid-grace"
    assert env["DATABASE_URL"].get("sync") is False, "a secret must not be in the file"


def _seconds(value: int | str) -> float:
    if isinstance(value, int):
        return float(value)
    m = re.fullmatch(r"(\d+)s", value)
    assert m, f"kill_timeout {value!r}"
    return float(m.group(1))


def test_fly_app() -> None:
    spec = tomllib.loads((ROOT / "fly.toml").read_text())
    assert spec["kill_signal"] in ("SIGTERM", "SIGINT")  # the worker drains on both
    grace = float(spec["env"].get("SHUTDOWN_GRACE_SECONDS", GRACE))
    assert _seconds(spec["kill_timeout"]) > grace, "Fly would kill the worker mid-grace"
    assert spec["processes"] == {"worker": "ai-jobs worker", "web": "ai-jobs web"}
    for line in [*spec["processes"].values(), spec["deploy"]["release_command"]]:
        _command(line)
    assert spec["deploy"]["release_command"] == "ai-jobs migrate"
    for name in spec["env"]:
        _setting(name)
    http = spec["http_service"]
    assert http["processes"] == ["web"]
    assert http["internal_port"] == int(spec["env"]["PORT"])
    assert [c["path"] for c in http["checks"]] == ["/healthz"]
    assert (ROOT / spec["build"]["dockerfile"]).is_file()


def test_dockerfile_ships_what_migrate_needs() -> None:
    text = (ROOT / "Dockerfile").read_text()
    for folder in ("listener", "sql", "triggers"):
        assert re.search(rf"^COPY {folder} {folder}$", text, re.MULTILINE), folder
    assert "pip install -r requirements.txt" in text
    python = (ROOT / ".python-version").read_text().strip()
    assert f"FROM python:{python}-" in text


def _instructions(text: str) -> list[tuple[str, str]]:
    """The Dockerfile's instructions (continuation lines joined), in order."""
    joined = re.sub(r"\\\n", " ", text)
    found = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            found.append((word.upper(), rest.strip()))
    return found


def _makes_owned_folder(command: str, user: str, folder: str) -> bool:
    """Does this RUN command leave `folder` a directory owned by `user`?"""
    made = owned = False
    for part in re.split(r"&&|;", command):
        words = shlex.split(part)
        if not words:
            continue
        if words[0] == "install" and "-d" in words and folder in words:
            made = True
            owned |= "-o" in words and words[words.index("-o") + 1] == user
        elif words[0] == "mkdir" and folder in words:
            made = True
        elif words[0] == "chown" and folder in words:
            owner = next(w for w in words[1:] if not w.startswith("-"))
            owned |= owner.split(":")[0] == user
    return made and owned


def test_dockerfile_image_can_write_its_default_storage() -> None:
    """As the image runs: its user, its working directory and its STORAGE_URL
    (the image's ENV, else the setting's default) name a folder that a RUN
    before the USER line (as root) made and gave to that user. Without it, the
    worker of the image refuses to start (it checks that it can write)."""
    steps = _instructions((ROOT / "Dockerfile").read_text())
    users = [i for i, (word, _) in enumerate(steps) if word == "USER"]
    assert users, "the image runs as root"
    user_at = users[-1]
    user = steps[user_at][1]
    assert user not in ("root", "0")
    workdir = [rest for word, rest in steps[:user_at] if word == "WORKDIR"][-1]
    storage = str(Settings.model_fields["storage_url"].default)
    for word, rest in steps:
        if word == "ENV":
            found = re.search(r"(?:^|\s)STORAGE_URL[= ]\s*(\S+)", rest)
            storage = found.group(1).strip("'\"") if found else storage
    storage = storage.removeprefix("file://")
    folder = posixpath.normpath(posixpath.join(workdir, storage))
    runs = [rest for word, rest in steps[:user_at] if word == "RUN"]
    assert any(_makes_owned_folder(cmd, user, folder) for cmd in runs), (
        f"no RUN before USER makes {folder} (STORAGE_URL {storage!r}) writable by {user}"
    )


def test_requirements_pin_every_dependency() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lines = [
        line.split("#")[0].strip()
        for line in (ROOT / "requirements.txt").read_text().splitlines()
        if line.split("#")[0].strip()
    ]
    assert lines[-1] == ".", "the project itself is installed last"
    pins: dict[str, Version] = {}
    for line in lines[:-1]:
        req = Requirement(line)
        (spec,) = req.specifier
        assert spec.operator == "==", line
        pins[req.name.lower()] = Version(spec.version)
    for dep in project["dependencies"]:
        req = Requirement(dep)
        name = req.name.lower()
        assert name in pins, f"{name} is not pinned: run `make lock`"
        assert req.specifier.contains(pins[name]), f"{name}=={pins[name]} outside {dep}"
    python = Version((ROOT / ".python-version").read_text().strip())
    assert python in Requirement(f"python{project['requires-python']}").specifier


_LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
_PATH = re.compile(r"`((?:listener|sql|triggers|tests|bench|docs)/[\w./-]+)`")
# Made by a command, not kept in the repository (.gitignore).
GENERATED = {
    "bench/.venv",
    ".venv",
    ".demo",
    ".storage",
    "bench/results/console-latest.json",  # make bench ARGS=--console-only
    "bench/results/pipeline-latest.json",  # make bench ARGS=--pipeline-only
}
_DOCS = sorted([ROOT / "README.md", ROOT / "CONTRIBUTING.md", *(ROOT / "docs").glob("*.md")])


@pytest.mark.parametrize("doc", _DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_docs_cite_only_files_of_the_repository(doc: Path) -> None:
    text = doc.read_text()
    cited = [m for m in _LINK.findall(text) if "://" not in m and not m.startswith("mailto:")]
    missing = [c for c in cited if not (doc.parent / c).exists()]
    for m in _PATH.findall(text):
        path = m.split(":")[0].rstrip(".")
        if path not in GENERATED and not (ROOT / path).exists():
            missing.append(path)
    assert not missing, f"{doc.name} cites files that are not in the repository: {missing}"
