"""Limits on every document the broker reads: size, nesting depth and number of items.

Resource files, KV documents, socket request bodies and Vault answers are all checked before
they are used, so a hostile or broken document gets a clear error instead of a
``RecursionError`` traceback, a stalled process or a 500. Counting is iterative and stops at
the limit, so a YAML alias bomb costs no more than a document at the limit.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from broker.errors import ValidationError
from broker.records import record

MiB = 1024 * 1024
_LEAVES = (str, int, float, type(None))  # what JSON and YAML scalars parse to (bool is an int)


@record(frozen=True)
class Limits:
    max_bytes: int = 8 * MiB
    max_depth: int = 64
    max_items: int = 200_000  # containers, keys and scalars together


FILES = Limits(max_bytes=16 * MiB)
CONTEXTS = Limits(max_bytes=8 * MiB)
REQUESTS = Limits(max_bytes=1 * MiB, max_items=50_000)


def check_size(length: int, limits: Limits, what: str) -> None:
    if length > limits.max_bytes:
        raise ValidationError(what, [f"larger than {limits.max_bytes} bytes"])


def check_tree(document: Any, limits: Limits, what: str) -> None:
    """Refuse a parsed document nested deeper or holding more items than ``limits`` allow.

    Level by level, so the work per item happens in C (``list.extend``): a context of a
    thousand values is checked in well under a millisecond."""
    level: list[Any] = [document]
    depth, items = 1, 0
    while level:
        items += len(level)
        below: list[Any] = []
        for node in level:
            if isinstance(node, _LEAVES):  # most nodes: no ABC check for them
                continue
            if isinstance(node, dict | Mapping):
                items += len(node)  # its keys
                below.extend(node.values())
            elif isinstance(node, list | tuple):
                below.extend(node)
        if items > limits.max_items:
            raise ValidationError(what, [f"more than {limits.max_items} items"])
        if below and depth >= limits.max_depth:
            raise ValidationError(what, [f"nested deeper than {limits.max_depth} levels"])
        depth += 1
        level = below


def parse_json(text: str | bytes, limits: Limits, what: str) -> Any:
    """``json.loads`` within ``limits``; malformed or oversized input is a ValidationError."""
    check_size(len(text), limits, what)
    try:
        document = json.loads(text)
    except RecursionError:
        raise ValidationError(what, [f"nested deeper than {limits.max_depth} levels"]) from None
    except (ValueError, UnicodeDecodeError) as exc:
        where = f" at line {exc.lineno}" if isinstance(exc, json.JSONDecodeError) else ""
        raise ValidationError(what, [f"not valid JSON{where}"]) from None
    check_tree(document, limits, what)
    return document
