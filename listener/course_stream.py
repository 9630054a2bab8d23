"""A course read as it streams in: the answer's text is fed chunk by chunk, and
each group of the course is validated on its own as soon as its closing brace
arrives, so that the groups finished so far can be shown (the job's
`partial_result`) long before the answer ends.

The reader is incremental and linear in the answer's size: each character is
looked at once (the regular expressions below jump over the inside of strings
and over plain values), and the text kept is only that of the value being
read (a field's value, a group), joined once when it ends. `work` counts the
characters examined and copied, so tests can check the linearity by counting,
not timing.

It never raises on bad input: text that stops being JSON it can follow sets
`broken` and the rest is ignored (the whole answer is still validated at the
end, parse_course, and the repair round deals with it). A group that is not
valid on its own (or has the wrong number of items) is counted in `rejected`
and never shown.
"""

from __future__ import annotations

import contextlib
import json
import re
from typing import Any

from pydantic import ValidationError

from listener.course_schema import CourseParams, Group

# Outside strings: the characters that change the structure; inside: the end of
# the string or an escape.
_STRUCTURE = re.compile(r'[{}\[\]",:]')
_IN_STRING = re.compile(r'["\\]')
_CLOSE = {"}": "{", "]": "["}
# Where things are: depth 1 is inside the course object, 2 inside `groups`,
# 3 inside a group, 4 inside its `items`, 5 inside an item.
_TOP, _GROUPS, _GROUP, _ITEMS = 1, 2, 3, 4


class CourseStream:
    def __init__(self, expected: CourseParams | None = None) -> None:
        self.expected = expected
        self.fields: dict[str, Any] = {}  # the course's other fields, as they end
        self.groups: list[dict[str, Any]] = []  # the finished groups valid on their own
        self.rejected = 0  # finished groups that are not
        self.items_in_group = 0  # items finished in the group being read
        self.broken: str | None = None  # why the text stopped being followed
        self.chars = 0  # characters fed
        self.work = 0  # characters examined + copied: linear in `chars`
        self.done = False  # the course object has closed
        self._stack: list[str] = []  # open brackets
        self._started = False
        self._in_string = False
        self._escape = False
        self._key_next = True  # at depth 1, the next string is a key
        self._key: str | None = None
        self._groups_next = False  # the value after "groups": is coming
        self._in_groups = False
        # The value being kept: its pieces from earlier chunks, its kind (key,
        # value, group), where it began in the current chunk.
        self._pieces: list[str] | None = None
        self._kind = ""
        self._from = 0

    @property
    def depth(self) -> int:
        return len(self._stack)

    def feed(self, chunk: str) -> int:
        """Read the next piece of the answer; the number of groups it finished."""
        if not chunk:
            return 0
        self.chars += len(chunk)
        if self.broken is not None or self.done:
            return 0
        before = len(self.groups) + self.rejected
        self._from = 0
        i, n = 0, len(chunk)
        if not self._started:
            i = chunk.find("{")
            self.work += n if i < 0 else i
            if i < 0:
                return 0
        while i < n and self.broken is None and not self.done:
            if self._in_string:
                if self._escape:  # the character after a backslash, whatever it is
                    self._escape = False
                    i += 1
                    continue
                m = _IN_STRING.search(chunk, i)
                if m is None:
                    self.work += n - i
                    i = n
                    break
                j = m.start()
                self.work += j - i + 1
                if chunk[j] == "\\":
                    if j + 1 < n:
                        i = j + 2
                    else:
                        self._escape = True
                        i = n
                    continue
                self._in_string = False
                i = j + 1
                if self._kind == "key" and self.depth == _TOP:
                    self._key = _key(self._end(chunk, i))
                continue
            m = _STRUCTURE.search(chunk, i)
            if m is None:
                self.work += n - i
                i = n
                break
            j = m.start()
            self.work += j - i + 1
            self._at(chunk, j)
            i = j + 1
        if self._pieces is not None:  # the value goes on in the next chunk
            self._pieces.append(chunk[self._from :])
            self.work += n - self._from
        return len(self.groups) + self.rejected - before

    def _at(self, chunk: str, j: int) -> None:
        """A structural character outside strings, at chunk[j]."""
        c = chunk[j]
        depth = self.depth
        if c == '"':
            self._in_string = True
            if depth == _TOP and self._key_next and self._pieces is None:
                self._begin("key", j)
            return
        if c == ":":
            if depth == _TOP and self._key_next:
                self._key_next = False
                if self._key == "groups":
                    self._groups_next = True
                else:
                    self._begin("value", j + 1)
            return
        if c == ",":
            if depth == _TOP:
                self._field_ends(chunk, j)
            return
        if c in "{[":
            if not self._started:
                self._started = True
            elif depth == _TOP and self._groups_next:
                self._groups_next = False
                self._in_groups = c == "["
            elif depth == _GROUPS and self._in_groups and c == "{":
                self.items_in_group = 0
                self._begin("group", j)
            self._stack.append(c)
            return
        # a closing bracket
        if not self._stack or self._stack[-1] != _CLOSE[c]:
            self.broken = f"unexpected {c!r} at character {self.chars - len(chunk) + j + 1}"
            return
        self._stack.pop()
        depth = self.depth
        if depth == _TOP and self._in_groups:
            self._in_groups = False  # the end of `groups`
        elif depth == _GROUPS and self._in_groups and self._kind == "group" and c == "}":
            self._group_ends(self._end(chunk, j + 1))
            self.items_in_group = 0
        elif depth == _ITEMS and self._in_groups and c == "}":
            self.items_in_group += 1
        elif depth == 0:
            self._field_ends(chunk, j)
            self.done = True

    def _begin(self, kind: str, j: int) -> None:
        self._pieces, self._kind, self._from = [], kind, j

    def _end(self, chunk: str, k: int) -> str:
        """The kept value, up to chunk[k] (excluded)."""
        assert self._pieces is not None
        self._pieces.append(chunk[self._from : k])
        self.work += k - self._from
        text = "".join(self._pieces)
        self.work += len(text)
        self._pieces, self._kind = None, ""
        return text

    def _field_ends(self, chunk: str, j: int) -> None:
        """A `,` or the closing `}` at the course's level: the value read ends."""
        if self._kind == "value":
            text = self._end(chunk, j)
            if self._key is not None:
                # a value that is not JSON: the whole answer's validation says so
                with contextlib.suppress(ValueError):
                    self.fields[self._key] = json.loads(text)
        self._key_next, self._key, self._groups_next = True, None, False

    def _group_ends(self, text: str) -> None:
        try:
            group = Group.model_validate_json(text)
        except ValidationError:
            self.rejected += 1
            return
        if self.expected is not None and len(group.items) != self.expected.items_per_group:
            self.rejected += 1
            return
        self.groups.append(group.model_dump())

    def fraction(self) -> float:
        """How much of the course is read, 0-1, by items (as the params ask)."""
        if self.expected is None:
            return 0.0
        per = self.expected.items_per_group
        total = self.expected.group_count * per
        done = (len(self.groups) + self.rejected) * per + min(self.items_in_group, per - 1)
        return min(1.0, done / total) if total else 0.0

    def partial(self, course_id: str, subject: str) -> dict[str, Any] | None:
        """The course with the groups finished so far, in course.json's shape
        (None before the first group); the job decides the id and the subject."""
        if not self.groups:
            return None
        out: dict[str, Any] = {
            k: v for k, v in self.fields.items() if k in _FIELDS and isinstance(v, str)
        }
        out.update(id=course_id, subject=subject, groups=list(self.groups))
        return out


def _key(text: str) -> str | None:
    try:
        key = json.loads(text)
    except ValueError:
        return None
    return key if isinstance(key, str) else None


_FIELDS = ("title", "description", "level", "language")
