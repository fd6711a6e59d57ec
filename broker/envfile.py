"""The env-file dialect, once: what the broker writes as ``env`` and what ``--env-file`` reads.

Written: one ``NAME='value'`` line per variable, POSIX-shell single-quoted (a quote inside is
``'\\''``), so ``set -a; . ./env`` in any POSIX shell gives exactly the values.

Read: the same, plus what people write by hand that a shell would read the same way without
expanding anything — blank lines, ``#`` comments, an ``export`` prefix, unquoted words with
backslash escapes, and double-quoted segments with ``\\"``, ``\\\\``, ``\\$`` and ``\\```
escapes. A ``$`` or a backtick that a shell would expand, a missing ``=``, an unterminated
quote or a bad name is an error naming the line: nothing is ever dropped silently.
"""

from __future__ import annotations

from collections.abc import Mapping

from broker import names
from broker.errors import ValidationError

_UNQUOTED_SPECIAL = set("|&;<>()*?[]~{}")
_DOUBLE_ESCAPES = set('"\\$`')


def quote(value: str) -> str:
    """POSIX-shell single quoting."""
    return "'" + value.replace("'", "'\\''") + "'"


def write(values: Mapping[str, str]) -> str:
    """``NAME='value'`` lines, sorted by name."""
    return "".join(f"{name}={quote(value)}\n" for name, value in sorted(values.items()))


class _Problem(Exception):
    pass


class _Reader:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0
        self.line = 1

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def take(self) -> str:
        char = self.text[self.pos]
        self.pos += 1
        self.line += char == "\n"
        return char

    def skip_blank(self) -> None:
        """Whitespace, empty lines and comment lines before the next assignment."""
        while self.pos < len(self.text):
            char = self.peek()
            if char in " \t\r\n":
                self.take()
            elif char == "#":
                while self.peek() not in ("", "\n"):
                    self.take()
            else:
                return

    def name(self) -> str:
        start = self.pos
        while self.peek() not in ("", "=", "\n", " ", "\t"):
            self.take()
        name = self.text[start : self.pos]
        if name == "export" and self.peek() in (" ", "\t"):
            while self.peek() in (" ", "\t"):
                self.take()
            return self.name()
        if self.peek() != "=":
            raise _Problem("expected NAME=VALUE (the line has no '=')")  # never echo: a value?
        if not names.matches(names.VARIABLE_NAME, name):
            raise _Problem(f"{name!r} is not a valid variable name")
        self.take()
        return name

    def word(self) -> str:
        parts: list[str] = []
        while (char := self.peek()) not in ("", "\n", " ", "\t"):
            if char == "'":
                parts.append(self.single_quoted())
            elif char == '"':
                parts.append(self.double_quoted())
            elif char == "\\":
                self.take()
                if self.peek() == "":
                    raise _Problem("a backslash ends the file")
                escaped = self.take()
                parts.append("" if escaped == "\n" else escaped)
            elif char in "$`":
                raise _Problem(f"unquoted {char} would be expanded by a shell; quote it with '...'")
            elif char in _UNQUOTED_SPECIAL:
                raise _Problem(f"unquoted {char} means something to a shell; quote the value")
            else:
                parts.append(self.take())
        return "".join(parts)

    def single_quoted(self) -> str:
        self.take()
        start = self.pos
        while self.peek() != "'":
            if self.peek() == "":
                raise _Problem("unterminated single quote")
            self.take()
        value = self.text[start : self.pos]
        self.take()
        return value

    def double_quoted(self) -> str:
        self.take()
        parts: list[str] = []
        while (char := self.peek()) != '"':
            if char == "":
                raise _Problem("unterminated double quote")
            if char in "$`":
                raise _Problem(f"{char} inside double quotes would be expanded by a shell")
            self.take()
            if char == "\\" and self.peek() in _DOUBLE_ESCAPES:
                char = self.take()
            parts.append(char)
        self.take()
        return "".join(parts)

    def end_of_line(self) -> None:
        while self.peek() in (" ", "\t", "\r"):
            self.take()
        if self.peek() == "#":
            while self.peek() not in ("", "\n"):
                self.take()
        if self.peek() not in ("", "\n"):
            raise _Problem("one assignment per line (quote values that contain spaces)")


def read(text: str, source: str) -> dict[str, str]:
    """Parse an env file; a ValidationError names the source, the line and the problem."""
    reader = _Reader(text)
    values: dict[str, str] = {}
    while True:
        reader.skip_blank()
        if reader.pos >= len(text):
            return values
        line = reader.line
        try:
            name = reader.name()
            values[name] = reader.word()
            reader.end_of_line()
        except _Problem as problem:
            raise ValidationError(source, [f"line {line}: {problem}"]) from None
