"""`make bench` / `python -m bench`: runs in bench/.venv (made on first use)."""

from __future__ import annotations

import sys

from bench import venv

venv.ensure(sys.argv[1:])

from bench.runner import main  # noqa: E402 (after the switch into the bench's environment)

sys.exit(main(sys.argv[1:]))
