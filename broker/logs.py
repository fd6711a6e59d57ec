"""Structured JSON log lines that can never carry a value the broker has decrypted.

Every value registered with :func:`redact_values` is replaced by ``<redacted>`` in each log
record, in its exact form and its base64, URL-encoded and JSON-escaped forms.
"""

from __future__ import annotations

import base64
import json
import logging
import sys
import threading
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote, quote_plus

LOGGER_NAME = "stigmer_broker"
REDACTED = "<redacted>"
_MIN_REDACT_LENGTH = 4


class Redactor:
    """Holds the secret values seen so far and scrubs them (and their encodings) from text."""

    def __init__(self) -> None:
        self._forms: set[str] = set()
        self._ordered: tuple[str, ...] = ()  # longest first, rebuilt only when forms are added
        self._lock = threading.Lock()

    def add(self, values: Iterable[str]) -> None:
        forms = set()
        for value in values:
            if len(value) < _MIN_REDACT_LENGTH:
                continue
            raw = value.encode()
            forms.update(
                {
                    value,
                    base64.b64encode(raw).decode(),
                    base64.urlsafe_b64encode(raw).decode(),
                    base64.b64encode(raw).decode().rstrip("="),
                    quote(value, safe=""),
                    quote_plus(value),
                    json.dumps(value)[1:-1],
                }
            )
        with self._lock:
            new = {f for f in forms if f} - self._forms
            if new:
                self._forms |= new
                self._ordered = tuple(sorted(self._forms, key=len, reverse=True))

    def scrub(self, text: str) -> str:
        for form in self._ordered:
            if form in text:
                text = text.replace(form, REDACTED)
        return text


REDACTOR = Redactor()


def redact_values(values: Iterable[str]) -> None:
    REDACTOR.add(values)


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


def get() -> logging.Logger:
    return logging.getLogger(LOGGER_NAME)


def event(message: str, level: int = logging.INFO, **fields: Any) -> None:
    """Log one structured event."""
    get().log(level, message, extra={"fields": fields})
