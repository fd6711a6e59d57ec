"""The env-file dialect: what the broker writes, `--env-file` reads back exactly, and what it
cannot read is an error naming the line."""

from __future__ import annotations

import subprocess

import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker import envfile
from broker.errors import ValidationError

pytestmark = pytest.mark.unit

names = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,12}", fullmatch=True)
values = st.text(
    st.characters(blacklist_characters="\0", blacklist_categories=("Cs",)), max_size=40
)


@given(st.dictionaries(names, values, max_size=8))
def test_property_what_is_written_reads_back_exactly(table: dict[str, str]) -> None:
    assert envfile.read(envfile.write(table), "env") == table


def test_a_shell_reads_the_same_values() -> None:
    table = {"A": "it's", "B": '$HOME `x` \\ "q"', "C": "two\nlines", "D": ""}
    script = envfile.write(table) + 'printf "%s\\0" "$A" "$B" "$C" "$D"'
    out = subprocess.run(["sh", "-c", script], capture_output=True, check=True, env={}).stdout
    assert out.decode().split("\0")[:4] == list(table.values())


def test_lines_people_write_by_hand() -> None:
    text = "# comment\n\nexport A=1\nB='it'\\''s'\nC=\"x \\$y\" # trailing\nD=a\\ b\n"
    assert envfile.read(text, "f") == {"A": "1", "B": "it's", "C": "x $y", "D": "a b"}


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("A=1\nNOEQUALS\n", "line 2: expected NAME=VALUE"),
        ("A=$HOME\n", "line 1: unquoted $ would be expanded by a shell"),
        ("A=`id`\n", "line 1: unquoted ` would be expanded"),
        ('A="x$y"\n', "line 1: $ inside double quotes would be expanded"),
        ("A='open\n", "line 1: unterminated single quote"),
        ("1A=x\n", "line 1: '1A' is not a valid variable name"),
        ("A=b c\n", "line 1: one assignment per line"),
        ("A=x;id\n", "line 1: unquoted ; means something to a shell"),
        ("id\n=1\n", "line 1: expected NAME=VALUE"),
    ],
)
def test_unreadable_lines_are_errors_naming_the_line(text: str, problem: str) -> None:
    with pytest.raises(ValidationError) as caught:
        envfile.read(text, "--env-file f")
    assert problem in str(caught.value)
    assert str(caught.value).startswith("--env-file f: ")


def test_a_line_without_equals_is_never_echoed() -> None:
    with pytest.raises(ValidationError) as caught:
        envfile.read("ghp_pasted_secret_value\n", "f")
    assert "ghp_pasted" not in str(caught.value)
