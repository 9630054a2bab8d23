"""Every `ai-jobs` command's --help says what the command does: a description
paragraph under the usage line, not only the one-line entry of the list."""

from __future__ import annotations

import argparse

import pytest

from listener import cli


def _commands(
    parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()
) -> list[tuple[str, ...]]:
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found.append((*prefix, name))
                found += _commands(sub, (*prefix, name))
    return found


COMMANDS = _commands(cli.build_parser())


def test_every_command_is_found() -> None:
    names = {c[-1] for c in COMMANDS}
    assert {"migrate", "worker", "run-once", "web", "demo", "course", "media"} <= names
    assert len(COMMANDS) >= 20


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_help_says_what_the_command_does(
    command: tuple[str, ...], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main([*command, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    usage, _, rest = out.partition("\n\n")
    assert usage.startswith(f"usage: ai-jobs {' '.join(command)}")
    description = rest.split("\n\n")[0]
    assert not description.startswith(("options:", "positional arguments:")), out
    words = " ".join(description.split())
    assert words.endswith(".") and len(words.split()) >= 8, words  # a sentence, at least
