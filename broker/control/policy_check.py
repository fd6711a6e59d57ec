"""`policy check`: log in as each identity and prove, against a live Vault, what it may do.

Every cell of the matrix is a real request made with that identity's token: 403 means denied,
anything else (success, 404, 400 from the handler) means Vault's ACL let it through. Probe
objects get a random name and are removed afterwards with the caller's (admin) token.
"""

from __future__ import annotations

import base64
import secrets
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager, suppress

from broker.config import Layout
from broker.errors import BrokerError, ConfigError, PermissionDenied
from broker.records import field, record
from broker.vault import KV, Transit, VaultClient, jwt_login
from broker.vault.kv import FORMAT

IDENTITIES = ("control-plane", "runner", "reaper", "admin")
ALLOW, DENY = "allow", "deny"

# operation → identity → (own tenant, other tenant); a single value when not tenant-scoped.
EXPECTED: dict[str, dict[str, tuple[str, ...]]] = {
    "read context": {
        "control-plane": (ALLOW, ALLOW), "runner": (ALLOW, DENY),
        "reaper": (DENY, DENY), "admin": (ALLOW, ALLOW),
    },
    "list contexts": {
        "control-plane": (ALLOW, ALLOW), "runner": (DENY, DENY),
        "reaper": (ALLOW, ALLOW), "admin": (ALLOW, ALLOW),
    },
    "write context": {
        "control-plane": (ALLOW, ALLOW), "runner": (DENY, DENY),
        "reaper": (DENY, DENY), "admin": (DENY, DENY),
    },
    "destroy context": {
        "control-plane": (ALLOW, ALLOW), "runner": (ALLOW, DENY),
        "reaper": (ALLOW, ALLOW), "admin": (DENY, DENY),
    },
    "read environment": {
        "control-plane": (ALLOW, ALLOW), "runner": (DENY, DENY),
        "reaper": (DENY, DENY), "admin": (ALLOW, ALLOW),
    },
    "write environment": {
        "control-plane": (ALLOW, ALLOW), "runner": (DENY, DENY),
        "reaper": (DENY, DENY), "admin": (DENY, DENY),
    },
    "list environments": {
        "control-plane": (ALLOW, ALLOW), "runner": (DENY, DENY),
        "reaper": (DENY, DENY), "admin": (ALLOW, ALLOW),
    },
    "claim": {
        "control-plane": (DENY, DENY), "runner": (ALLOW, DENY),
        "reaper": (DENY, DENY), "admin": (DENY, DENY),
    },
    "read claim": {
        "control-plane": (DENY, DENY), "runner": (ALLOW, DENY),
        "reaper": (DENY, DENY), "admin": (DENY, DENY),
    },
    "encrypt": {
        "control-plane": (ALLOW, ALLOW), "runner": (DENY, DENY),
        "reaper": (DENY, DENY), "admin": (DENY, DENY),
    },
    "decrypt": {
        "control-plane": (DENY, DENY), "runner": (ALLOW, DENY),
        "reaper": (DENY, DENY), "admin": (DENY, DENY),
    },
    "token create": {
        "control-plane": (DENY,), "runner": (ALLOW,), "reaper": (DENY,), "admin": (ALLOW,),
    },
    "revoke by accessor": {
        "control-plane": (DENY,), "runner": (DENY,), "reaper": (ALLOW,), "admin": (ALLOW,),
    },
}  # fmt: skip


@record
class Cell:
    operation: str
    identity: str
    scope: str  # "own", "other" or "-"
    expected: str
    got: str

    @property
    def ok(self) -> bool:
        return self.expected == self.got


@record
class CheckReport:
    tenant: str
    other_tenant: str
    cells: list[Cell] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(cell.ok for cell in self.cells)

    def as_json(self) -> dict[str, object]:
        return {
            "tenant": self.tenant,
            "other_tenant": self.other_tenant,
            "ok": self.ok,
            "cells": [vars(cell) | {"ok": cell.ok} for cell in self.cells],
        }

    def table(self) -> str:
        """The allowed/denied matrix; a cell that differs from the expectation is flagged."""
        header = ["operation", *IDENTITIES]
        rows = []
        for operation in EXPECTED:
            row = [operation]
            for identity in IDENTITIES:
                cells = [
                    c for c in self.cells if c.operation == operation and c.identity == identity
                ]
                row.append(" / ".join(c.got + ("" if c.ok else " (!)") for c in cells))
            rows.append(row)
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
        scoped = f"{self.tenant} / {self.other_tenant}"
        lines.append(f"(tenant-scoped cells: {scoped}; (!) = differs from the expected matrix)")
        return "\n".join(lines)


async def _outcome(action: Awaitable[object]) -> str:
    try:
        await action
    except PermissionDenied:
        return DENY
    except BrokerError:
        return ALLOW  # the ACL let it through; the handler refused it for another reason
    return ALLOW


class PolicyCheck:
    def __init__(self, admin: VaultClient, layout: Layout) -> None:
        self._admin = admin
        self._layout = layout
        self._probe = "policy-check-" + secrets.token_hex(4)
        self._tokens: list[str] = []
        self._ciphertexts: dict[str, str] = {}

    async def _token_for(self, policy: str) -> VaultClient:
        answer = await self._admin.post(
            "auth/token/create",
            {"policies": [policy], "ttl": "5m", "display_name": f"policy-check-{policy}"},
            operation="create-token",
        )
        token = str(answer["auth"]["client_token"])
        self._tokens.append(token)
        return self._admin.with_token(token)

    async def _tenanted(
        self, operation: str, identity: str, client: VaultClient, tenant: str
    ) -> object:
        """One tenant-scoped operation of the matrix, performed with ``client``'s token.

        Each identity gets its own probe name, so one identity's write never turns another's
        "create" into an "update".
        """
        layout, probe = self._layout, f"{self._probe}-{identity}"
        kv, store = layout.kv_mount, KV(client, layout.kv_mount)
        context, environment = f"execution-contexts/{tenant}", f"environments/{tenant}"
        transit = f"{layout.transit_mount}/%s/{layout.transit_key(tenant)}"
        document = {"format": FORMAT, "resource": "{}"}
        match operation:
            case "read context":
                return await client.get(f"{kv}/data/{context}/{probe}")
            case "list contexts":
                return await client.request("LIST", f"{kv}/metadata/{context}")
            case "write context":  # as `execution create` issues: metadata, then cas-0 data
                await store.write_metadata(f"{context}/{probe}", max_versions=1)
                return await store.write(f"{context}/{probe}", document, cas=0)
            case "destroy context":
                return await client.delete(f"{kv}/metadata/{context}/{probe}-absent")
            case "read environment":
                return await client.get(f"{kv}/data/{environment}/{probe}")
            case "write environment":
                return await store.write(f"{environment}/{probe}", document, cas=0)
            case "list environments":
                return await client.request("LIST", f"{kv}/metadata/{environment}")
            case "claim":
                claim = f"execution-claims/{tenant}/{probe}"
                return await store.write(claim, {"pod": "check"}, cas=0)
            case "read claim":
                return await client.get(f"{kv}/data/execution-claims/{tenant}/{probe}")
            case "encrypt":
                plaintext = base64.b64encode(b"policy-check").decode()
                return await client.post(transit % "encrypt", {"plaintext": plaintext})
            case "decrypt":
                ciphertext = self._ciphertexts[tenant]
                return await client.post(transit % "decrypt", {"ciphertext": ciphertext})
        raise ValueError(operation)

    async def _untenanted(self, client: VaultClient, operation: str) -> object:
        if operation == "token create":
            answer = await client.post(
                "auth/token/create",
                {"policies": ["stigmer-runner"], "no_default_policy": True, "ttl": "60s"},
                operation="create-token",
            )
            self._tokens.append(str(answer["auth"]["client_token"]))
            return answer
        return await client.post(
            "auth/token/revoke-accessor", {"accessor": "policy-check-no-such-accessor"}
        )

    @asynccontextmanager
    async def _cleanup(self, tenants: tuple[str, str]) -> AsyncIterator[None]:
        try:
            yield
        finally:
            kv = KV(self._admin, self._layout.kv_mount)
            for tenant in tenants:
                for folder in ("execution-contexts", "environments", "execution-claims"):
                    for identity in IDENTITIES:
                        with suppress(BrokerError):
                            await kv.destroy(f"{folder}/{tenant}/{self._probe}-{identity}")
            for token in self._tokens:
                with suppress(BrokerError):
                    await self._admin.with_token(token).post("auth/token/revoke-self")

    async def run(self, tenant: str, other: str, runner_jwt: str) -> CheckReport:
        tenants = (tenant, other)
        report = CheckReport(tenant, other)
        async with self._cleanup(tenants):
            identities = {
                "control-plane": await self._token_for("stigmer-control-plane"),
                "reaper": await self._token_for("stigmer-reaper"),
                "admin": await self._token_for("stigmer-admin"),
            }
            login = await jwt_login(
                self._admin, self._layout.jwt_mount, self._layout.runner_role, runner_jwt
            )
            self._tokens.append(login.token)
            identities["runner"] = self._admin.with_token(login.token)
            transit = Transit(identities["control-plane"], self._layout.transit_mount)
            for name in tenants:
                try:
                    self._ciphertexts[name] = (
                        await transit.encrypt(self._layout.transit_key(name), ["probe"])
                    )[0]
                except BrokerError:
                    raise ConfigError(
                        f"tenant {name}: cannot encrypt with {self._layout.transit_key(name)} "
                        f"as the control plane; run `stigmer-broker setup --tenant {name}`"
                    ) from None
            for operation, expected in EXPECTED.items():
                for identity in IDENTITIES:
                    client = identities[identity]
                    wanted = expected[identity]
                    if len(wanted) == 2:
                        for scope, name, want in zip(
                            ("own", "other"), tenants, wanted, strict=True
                        ):
                            got = await _outcome(self._tenanted(operation, identity, client, name))
                            report.cells.append(Cell(operation, identity, scope, want, got))
                    else:
                        got = await _outcome(self._untenanted(client, operation))
                        report.cells.append(Cell(operation, identity, "-", wanted[0], got))
        return report
