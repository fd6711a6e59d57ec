"""Environments in KV v2: secret values encrypted with the tenant's Transit key on arrival."""

from __future__ import annotations

from typing import Any

from broker import names
from broker.config import Layout
from broker.control.orgs import org_problems
from broker.control.stored import load_stored
from broker.errors import Conflict, NotFound, ResourceNotFound, ValidationError
from broker.model import Environment, to_document
from broker.vault import KV, Transit, VaultClient

MASK = "<secret>"
KEPT_VERSIONS = 10  # KV v2's default max_versions: the versions a reference may name
CIPHERTEXT_PREFIX = "vault:v"


def is_ciphertext(value: str) -> bool:
    return value.startswith(CIPHERTEXT_PREFIX)


def masked(resource: Environment) -> dict[str, Any]:
    """The resource as a document with every secret value replaced by ``<secret>``."""
    document = to_document(resource)
    for entry in document.get("spec", {}).get("data", {}).values():
        if entry.get("is_secret") and entry.get("value"):
            entry["value"] = MASK
    return document


class EnvironmentStore:
    """Create, replace, read, list and delete a tenant's Environments."""

    def __init__(self, client: VaultClient, layout: Layout) -> None:
        self._layout = layout
        self._kv = KV(client, layout.kv_mount)
        self._transit = Transit(client, layout.transit_mount)

    async def _sealed(self, tenant: str, environment: Environment) -> dict[str, Any]:
        """The document to store: secret values replaced by their ciphertext, in one batch."""
        problems = org_problems(tenant, [("metadata.org", environment.metadata.org)])
        if problems:
            raise ValidationError(f"Environment {environment.name}", problems)
        document = environment.model_dump(mode="json", exclude_none=True)
        data = document["spec"]["data"]
        names = [n for n, e in data.items() if e["is_secret"] and e["value"]]
        if names:
            ciphertexts = await self._transit.encrypt(
                self._layout.transit_key(tenant), [data[n]["value"] for n in names]
            )
            for name, ciphertext in zip(names, ciphertexts, strict=True):
                data[name]["value"] = ciphertext
        document["metadata"]["name"] = environment.name
        return document

    async def apply(self, tenant: str, environment: Environment) -> int:
        """Create or replace; check-and-set on the version read, so a concurrent edit fails."""
        path = self._layout.environment_path(tenant, environment.name)
        try:
            version = (await self._kv.read_resource(path))[1]
        except NotFound:
            version = 0
        document = await self._sealed(tenant, environment)
        try:
            return await self._kv.write_resource(path, document, cas=version)
        except Conflict:
            raise ValidationError(
                f"Environment {environment.name}",
                ["changed concurrently while being applied; apply again"],
            ) from None

    async def create(self, tenant: str, environment: Environment) -> int:
        """Create only: an existing Environment of that name is an error, left untouched."""
        path = self._layout.environment_path(tenant, environment.name)
        document = await self._sealed(tenant, environment)
        try:
            return await self._kv.write_resource(path, document, cas=0)
        except Conflict:
            raise ValidationError(
                f"Environment {environment.name}",
                [f"already exists in tenant {tenant} (use `env apply` to replace it)"],
            ) from None

    async def replace(self, tenant: str, environment: Environment, version: int) -> int:
        """Write over ``version`` exactly (0: create only). A stale version raises
        :class:`~broker.errors.Conflict` and changes nothing (HTTP ``If-Match``)."""
        path = self._layout.environment_path(tenant, environment.name)
        document = await self._sealed(tenant, environment)
        return await self._kv.write_resource(path, document, cas=version)

    async def version(self, tenant: str, name: str) -> int:
        """The current version (0 when there is none), from the metadata only."""
        path = self._layout.environment_path(tenant, names.environment_name(name))
        try:
            return (await self._kv.read_metadata(path)).current_version
        except NotFound:
            return 0

    async def get(self, tenant: str, name: str) -> Environment:
        """The stored Environment; secret values are ciphertext."""
        return (await self.read(tenant, name))[0]

    async def read(
        self, tenant: str, name: str, version: int | None = None
    ) -> tuple[Environment, int]:
        """The stored Environment (secret values are ciphertext) and its version; ``version``:
        that stored version (KV v2 keeps the last ``KEPT_VERSIONS``)."""
        path = self._layout.environment_path(tenant, name)
        label = f"Environment {name}"
        missing = (
            f"not found in tenant {tenant}" if version is None else
            f"version {version} not found in tenant {tenant} (KV keeps the last {KEPT_VERSIONS})"
        )  # fmt: skip
        environment, version = await load_stored(
            self._kv, path, Environment, label, missing, with_version=True, version=version
        )
        for key, entry in environment.spec.data.items():
            if entry.is_secret and entry.value and not is_ciphertext(entry.value):
                raise ValidationError(
                    f"Environment {name}", [f"spec.data.{key}: secret stored without encryption"]
                )
        return environment, version

    async def list(self, tenant: str) -> list[str]:
        keys = await self._kv.list(self._layout.environments_dir(tenant))
        return sorted(k for k in keys if not k.endswith("/"))

    async def delete(self, tenant: str, name: str) -> None:
        """Destroy every version; works whatever the stored document holds."""
        path = self._layout.environment_path(tenant, names.environment_name(name))
        try:
            await self._kv.read_metadata(path)
        except NotFound:
            raise ResourceNotFound(
                f"Environment {name}", [f"not found in tenant {tenant}"]
            ) from None
        await self._kv.destroy(path)
