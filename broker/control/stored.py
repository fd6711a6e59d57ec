"""Reading stored resources back from KV into models, with one clear error when absent."""

from __future__ import annotations

from typing import TypeVar

from broker.errors import NotFound, ValidationError
from broker.model import parse_resource
from broker.model.base import Resource
from broker.vault import KV

T = TypeVar("T", bound=Resource)


async def load_stored(kv: KV, path: str, cls: type[T], label: str, missing: str) -> T:
    """The resource at ``path``; ``ValidationError(label, [missing])`` if there is none."""
    try:
        document, _ = await kv.read_resource(path)
    except NotFound:
        raise ValidationError(label, [missing]) from None
    return parse_resource(document, cls, stored=True)
