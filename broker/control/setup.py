"""Bootstrap any Vault for the broker, idempotently: read each piece, write only what differs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from broker import ids, policies
from broker.config import Layout
from broker.errors import ConfigError, NotFound
from broker.identity import DEFAULT_AUDIENCE, DEFAULT_ISSUER, SERVICE_ACCOUNT
from broker.vault import Transit, VaultClient


@dataclass(frozen=True)
class Change:
    item: str
    action: str  # "created", "updated" or "unchanged"


@dataclass(frozen=True)
class JwtSettings:
    public_keys: tuple[str, ...]
    issuer: str = DEFAULT_ISSUER
    audience: str = DEFAULT_AUDIENCE
    service_account: str = SERVICE_ACCOUNT
    token_ttl: str = "1h"
    token_max_ttl: str = "4h"


def _seconds(value: str) -> int:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    return int(value[:-1]) * units[value[-1]] if value[-1] in units else int(value)


class Bootstrap:
    def __init__(self, client: VaultClient, layout: Layout) -> None:
        self._client = client
        self._layout = layout
        self.changes: list[Change] = []

    def _note(self, item: str, action: str) -> None:
        self.changes.append(Change(item, action))

    def _mount(self, path: str, kind: str, options: dict[str, str]) -> None:
        mounts = self._client.get("sys/mounts").get("data", {})
        current = mounts.get(f"{path}/")
        if current is None:
            self._client.post(f"sys/mounts/{path}", {"type": kind, "options": options})
            self._note(f"secrets engine {path}/ ({kind})", "created")
            return
        if current.get("type") != kind or any(
            (current.get("options") or {}).get(k) != v for k, v in options.items()
        ):
            raise ConfigError(f"mount {path}/ exists but is not {kind} {options}; pick another")
        self._note(f"secrets engine {path}/ ({kind})", "unchanged")

    def _transit_key(self, tenant: str) -> None:
        transit = Transit(self._client, self._layout.transit_mount)
        key = self._layout.transit_key(tenant)
        if transit.key_exists(key):
            self._note(f"transit key {key}", "unchanged")
        else:
            transit.create_key(key)
            self._note(f"transit key {key}", "created")

    def _jwt_accessor(self) -> str:
        mount = self._layout.jwt_mount
        methods = self._client.get("sys/auth").get("data", {})
        current = methods.get(f"{mount}/")
        if current is None:
            self._client.post(f"sys/auth/{mount}", {"type": "jwt"})
            self._note(f"auth method {mount}/ (jwt)", "created")
            current = self._client.get("sys/auth").get("data", {})[f"{mount}/"]
        elif current.get("type") != "jwt":
            raise ConfigError(f"auth mount {mount}/ exists but is not jwt; pick another")
        else:
            self._note(f"auth method {mount}/ (jwt)", "unchanged")
        return str(current["accessor"])

    def _upsert(
        self, item: str, path: str, wanted: dict[str, Any], compare: dict[str, Any]
    ) -> None:
        try:
            current = self._client.get(path).get("data") or {}
        except NotFound:
            current = None
        if current is not None and all(current.get(k) == v for k, v in compare.items()):
            self._note(item, "unchanged")
            return
        self._client.post(path, wanted)
        self._note(item, "created" if current is None else "updated")

    def _jwt(self, settings: JwtSettings) -> None:
        mount = self._layout.jwt_mount
        keys = [k.strip() + "\n" for k in settings.public_keys]
        config = {"jwt_validation_pubkeys": keys, "bound_issuer": settings.issuer}
        compare = {
            "jwt_validation_pubkeys": [k.strip() for k in keys],
            "bound_issuer": settings.issuer,
        }
        self._upsert_config(f"auth/{mount}/config", config, compare)
        role = {
            "role_type": "jwt",
            "bound_audiences": [settings.audience],
            "user_claim": "sub",
            "bound_claims_type": "glob",
            "bound_claims": {"sub": f"system:serviceaccount:*:{settings.service_account}"},
            "claim_mappings": {
                "/kubernetes.io/namespace": "tenant",
                "/kubernetes.io/pod/name": "pod",
            },
            "token_policies": ["stigmer-runner"],
            "token_ttl": _seconds(settings.token_ttl),
            "token_max_ttl": _seconds(settings.token_max_ttl),
            "token_type": "service",
        }
        self._upsert(
            f"jwt role {self._layout.runner_role}",
            f"auth/{mount}/role/{self._layout.runner_role}",
            role,
            role,
        )

    def _upsert_config(self, path: str, wanted: dict[str, Any], compare: dict[str, Any]) -> None:
        try:
            current = self._client.get(path).get("data") or {}
        except NotFound:
            current = {}
        normalized = {
            "jwt_validation_pubkeys": [
                k.strip() for k in current.get("jwt_validation_pubkeys") or []
            ],
            "bound_issuer": current.get("bound_issuer"),
        }
        item = f"jwt config {path}"
        if normalized == compare:
            self._note(item, "unchanged")
            return
        self._client.post(path, wanted)
        self._note(item, "updated" if current else "created")

    def _policies(self, accessor: str) -> None:
        for name, text in policies.render(self._layout, accessor).items():
            self._upsert(
                f"policy {name}", f"sys/policies/acl/{name}", {"policy": text}, {"policy": text}
            )

    def run(self, tenants: Sequence[str], jwt: JwtSettings) -> list[Change]:
        for tenant in tenants:
            ids.tenant(tenant)
        self._mount(self._layout.kv_mount, "kv", {"version": "2"})
        self._mount(self._layout.transit_mount, "transit", {})
        for tenant in tenants:
            self._transit_key(tenant)
        accessor = self._jwt_accessor()
        self._jwt(jwt)
        self._policies(accessor)
        return self.changes
