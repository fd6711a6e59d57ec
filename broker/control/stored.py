"""Reading stored resources back from KV into models, with one clear error when absent."""

from __future__ import annotations

from typing import Literal, TypeVar, overload

from broker.errors import NotFound, ResourceNotFound
from broker.model import parse_resource
from broker.model.base import Resource
from broker.vault import KV

T = TypeVar("T", bound=Resource)


@overload
async def load_stored(
    kv: KV, path: str, cls: type[T], label: str, missing: str,
    with_version: Literal[False] = False, version: int | None = None,
) -> T: ...  # fmt: skip


@overload
async def load_stored(
    kv: KV, path: str, cls: type[T], label: str, missing: str, with_version: Literal[True],
    version: int | None = None,
) -> tuple[T, int]: ...  # fmt: skip


async def load_stored(
    kv: KV,
    path: str,
    cls: type[T],
    label: str,
    missing: str,
    with_version: bool = False,
    version: int | None = None,
) -> T | tuple[T, int]:
    """The resource at ``path`` (its current version, or ``version``; and the version read);
    ``ResourceNotFound(label, [missing])`` if there is none."""
    try:
        document, version = await kv.read_resource(path, version=version)
    except NotFound:
        raise ResourceNotFound(label, [missing]) from None
    resource = parse_resource(document, cls, stored=True)
    return (resource, version) if with_version else resource
