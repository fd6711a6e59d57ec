"""Structured JSON log lines that can never carry a value the broker has decrypted.

Every value registered with :data:`REDACTOR` is replaced by ``<redacted>`` in each log record,
in its exact form and its base64 (standard or URL-safe, padded or not), URL-encoded and
JSON-escaped forms. A registration is released when its execution ends, so the redactor holds
only the values of live executions.
Scrubbing looks each position of a line up by its first four characters, so its cost does not
grow with the number of registered values.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import sys
import threading
from collections import Counter
from collections.abc import Iterable
from datetime import UTC, datetime
from itertools import chain
from json.encoder import encode_basestring_ascii
from typing import Any
from urllib.parse import quote, quote_plus

LOGGER_NAME = "stigmer_broker"
REDACTED = "<redacted>"
_PREFIX = 4  # values shorter than this are not redacted (too many false hits)


_PLAIN = re.compile(r"[A-Za-z0-9_.~-]*")  # unchanged by URL quoting and JSON escaping


def _forms(value: str) -> set[str]:
    # Base64 without its padding: the padded form (and any text it is cut from) begins with it.
    b64 = base64.b64encode(value.encode()).decode().rstrip("=")
    forms = {value, b64, b64.replace("+", "-").replace("/", "_")}
    if not _PLAIN.fullmatch(value):  # most tokens are plain: skip three encoders
        forms.update((quote(value, safe=""), quote_plus(value),
                      encode_basestring_ascii(value)[1:-1]))  # fmt: skip
    return {form for form in forms if len(form) >= _PREFIX}


class Registration:
    """One execution's values; ``release()`` removes them again."""

    def __init__(self, redactor: Redactor, values: list[str]) -> None:
        self._redactor = redactor
        self._values: list[str] | None = values  # until a line is scrubbed: then _forms
        self._forms: Counter[str] | None = None

    def release(self) -> None:
        self._redactor._release(self)


class Redactor:
    """Scrubs registered values (and their encodings) from text.

    A registration's forms are worked out when a line is first scrubbed after it, not when it
    is made: an execution that ends before any log line is written (``run`` at
    ``--log-level warning``) never pays for them (~5 ms for a thousand values)."""

    def __init__(self) -> None:
        self._counts: Counter[str] = Counter()
        self._by_prefix: dict[str, set[str]] = {}
        self._pending: set[Registration] = set()
        self._lock = threading.Lock()

    def register(self, values: Iterable[str]) -> Registration:
        registration = Registration(self, [v for v in values if len(v) >= _PREFIX])
        with self._lock:
            self._pending.add(registration)
        return registration

    def _index_pending(self) -> None:
        """Index the pending registrations' forms; the caller holds the lock."""
        for registration in self._pending:
            # Counting and set arithmetic in C: a thousand values in a few milliseconds.
            forms = Counter(chain.from_iterable(_forms(v) for v in registration._values or ()))
            registration._forms, registration._values = forms, None
            for form in forms.keys() - self._counts.keys():
                self._by_prefix.setdefault(form[:_PREFIX], set()).add(form)
            self._counts.update(forms)
        self._pending.clear()

    def _release(self, registration: Registration) -> None:
        with self._lock:
            self._pending.discard(registration)
            forms, registration._forms, registration._values = registration._forms, None, None
            if forms:
                self._remove(forms)

    def _remove(self, forms: Counter[str]) -> None:
        # One pass (Counter.subtract and a second loop took twice as long); under the lock.
        counts, by_prefix = self._counts, self._by_prefix
        for form, n in forms.items():
            left = counts.get(form, 0) - n
            if left > 0:
                counts[form] = left
                continue
            counts.pop(form, None)
            bucket = by_prefix.get(form[:_PREFIX])
            if bucket is not None:
                bucket.discard(form)
                if not bucket:
                    del by_prefix[form[:_PREFIX]]

    def __len__(self) -> int:
        """How many forms are registered."""
        with self._lock:
            self._index_pending()
            return len(self._counts)

    def scrub(self, text: str) -> str:
        if self._pending:
            with self._lock:
                self._index_pending()
        index = self._by_prefix
        if not index:
            return text
        out: list[str] = []
        start = position = 0
        end = len(text) - _PREFIX + 1
        while position < end:
            candidates = index.get(text[position : position + _PREFIX])
            match = _longest(text, position, candidates) if candidates else ""
            if match:
                out.append(text[start:position])
                out.append(REDACTED)
                position = start = position + len(match)
            else:
                position += 1
        out.append(text[start:])
        return "".join(out)


def _longest(text: str, position: int, candidates: Iterable[str]) -> str:
    found = ""
    for form in list(candidates):
        if len(form) > len(found) and text.startswith(form, position):
            found = form
    return found


REDACTOR = Redactor()


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info and record.exc_info[1] is not None:
            error = record.exc_info[1]
            entry["error"] = f"{type(error).__name__}: {error}"
        return REDACTOR.scrub(json.dumps(entry, default=str))


def setup(level: str = "info") -> logging.Logger:
    """JSON lines on stderr for the broker's logger; idempotent."""
    logger = logging.getLogger(LOGGER_NAME)
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonFormatter())
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(level.upper())
    return logger


def event(message: str, level: int = logging.INFO, **fields: Any) -> None:
    """Log one structured event."""
    logging.getLogger(LOGGER_NAME).log(level, message, extra={"fields": fields})


def security(message: str, event_name: str, **fields: Any) -> None:
    """A security event: warning level, with a stable ``event`` field to alert on."""
    logging.getLogger(LOGGER_NAME).log(
        logging.WARNING, message, extra={"fields": {"event": event_name, **fields}}
    )
