"""Bootstrap any Vault for the broker, idempotently: read each piece, write only what differs.

What it configures: the KV v2 and Transit mounts, one Transit key per tenant, the runner
identities (JWT auth always; Kubernetes auth and AppRole on request), and the policies.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from broker import names, policies
from broker.config import Layout
from broker.dev import DEFAULT_AUDIENCE, DEFAULT_ISSUER, SERVICE_ACCOUNT
from broker.errors import ConfigError, Fault, NotFound, VaultError
from broker.policies import IdentitySources
from broker.records import field, record
from broker.vault import Transit, VaultClient

RUNNER_POLICY = "stigmer-runner"
REAPER_POLICY = "stigmer-reaper"


@record(frozen=True)
class Change:
    item: str
    action: str  # "created", "updated" or "unchanged"


@record(frozen=True)
class TokenLimits:
    """Runner login tokens are short-lived; the broker renews them while it works."""

    ttl: int = 15 * 60
    max_ttl: int = 2 * 3600


@record(frozen=True)
class JwtSettings:
    """How Vault checks service-account JWTs: PEM keys, or a JWKS URL / OIDC discovery URL
    that Vault fetches itself (key rotation then needs no setup run)."""

    public_keys: tuple[str, ...] = ()
    jwks_url: str = ""
    oidc_discovery_url: str = ""
    ca_pem: str = ""  # the CA of the JWKS / discovery URL's server (e.g. the API server's)
    issuer: str = DEFAULT_ISSUER
    audience: str = DEFAULT_AUDIENCE
    service_account: str = SERVICE_ACCOUNT
    leeway_seconds: int = 60
    reaper_namespace: str = "stigmer-system"  # the one namespace whose stigmer-reaper may reap


@record(frozen=True)
class KubernetesSettings:
    host: str
    ca_cert: str = ""
    audience: str = DEFAULT_AUDIENCE
    service_account: str = SERVICE_ACCOUNT
    reaper_namespace: str = "stigmer-system"


@record(frozen=True)
class AppRoleSettings:
    tenants: tuple[str, ...]
    secret_id_ttl: int = 10 * 60
    secret_id_num_uses: int = 1


@record
class Bootstrap:
    client: VaultClient
    layout: Layout
    limits: TokenLimits = field(default_factory=TokenLimits)
    changes: list[Change] = field(default_factory=list)

    def _note(self, item: str, action: str) -> None:
        self.changes.append(Change(item, action))

    async def _mount(self, path: str, kind: str, options: dict[str, str]) -> None:
        mounts = (await self.client.get("sys/mounts")).get("data", {})
        current = mounts.get(f"{path}/")
        if current is None:
            await self.client.post(f"sys/mounts/{path}", {"type": kind, "options": options})
            self._note(f"secrets engine {path}/ ({kind})", "created")
            return
        if current.get("type") != kind or any(
            (current.get("options") or {}).get(k) != v for k, v in options.items()
        ):
            raise ConfigError(f"mount {path}/ exists but is not {kind} {options}; pick another")
        self._note(f"secrets engine {path}/ ({kind})", "unchanged")

    async def _transit_key(self, tenant: str) -> None:
        transit = Transit(self.client, self.layout.transit_mount)
        key = self.layout.transit_key(tenant)
        if await transit.key_exists(key):
            self._note(f"transit key {key}", "unchanged")
        else:
            await transit.create_key(key)
            self._note(f"transit key {key}", "created")

    async def _auth_mount(self, mount: str, kind: str) -> str:
        """Enable an auth method if needed; its accessor."""
        methods = (await self.client.get("sys/auth")).get("data", {})
        current = methods.get(f"{mount}/")
        if current is None:
            await self.client.post(f"sys/auth/{mount}", {"type": kind})
            self._note(f"auth method {mount}/ ({kind})", "created")
            current = (await self.client.get("sys/auth")).get("data", {})[f"{mount}/"]
        elif current.get("type") != kind:
            raise ConfigError(f"auth mount {mount}/ exists but is not {kind}; pick another")
        else:
            self._note(f"auth method {mount}/ ({kind})", "unchanged")
        return str(current["accessor"])

    async def _upsert(
        self,
        item: str,
        path: str,
        wanted: Mapping[str, Any],
        compare: Mapping[str, Any] | None = None,
    ) -> None:
        """Write ``wanted`` unless what is there already has every ``compare`` value."""
        try:
            current = (await self.client.get(path)).get("data") or {}
        except NotFound:
            current = None
        expected = wanted if compare is None else compare
        if current is not None and all(_same(current.get(k), v) for k, v in expected.items()):
            self._note(item, "unchanged")
            return
        await self.client.post(path, wanted)
        self._note(item, "created" if current is None else "updated")

    def _token_fields(self, policy: str = RUNNER_POLICY) -> dict[str, Any]:
        return {
            "token_policies": [policy],
            "token_ttl": self.limits.ttl,
            "token_max_ttl": self.limits.max_ttl,
            "token_type": "service",
        }

    async def jwt(self, settings: JwtSettings) -> str:
        mount = self.layout.jwt_mount
        accessor = await self._auth_mount(mount, "jwt")
        keys = [k.strip() for k in settings.public_keys]
        config = {  # exactly one source; the others cleared (a write replaces the config)
            "jwt_validation_pubkeys": keys,
            "jwks_url": settings.jwks_url,
            "jwks_ca_pem": settings.ca_pem if settings.jwks_url else "",
            "oidc_discovery_url": settings.oidc_discovery_url,
            "oidc_discovery_ca_pem": settings.ca_pem if settings.oidc_discovery_url else "",
            "bound_issuer": settings.issuer,
        }
        source = settings.jwks_url or settings.oidc_discovery_url or "the public keys"
        try:
            await self._upsert(f"jwt config auth/{mount}/config", f"auth/{mount}/config", config)
        except VaultError as exc:
            if exc.kind is not Fault.INVALID:
                raise
            raise ConfigError(
                f"Vault refused the issuer's keys from {source}: {exc.detail or 'invalid'}",
                hint="can Vault reach the URL (and trust its CA: --jwks-ca-cert)? is it the "
                "issuer's JWKS or discovery base URL?",
            ) from None
        leeway = settings.leeway_seconds
        role = {
            "role_type": "jwt",
            "bound_audiences": [settings.audience],
            "user_claim": "sub",
            "bound_claims_type": "glob",
            "bound_claims": {
                "sub": f"system:serviceaccount:*:{settings.service_account}",
                "/kubernetes.io/namespace": "*",  # required: it becomes the tenant
            },
            "claim_mappings": {
                "/kubernetes.io/namespace": "tenant",
                "/kubernetes.io/pod/name": "pod",
            },
            "expiration_leeway": leeway,
            "not_before_leeway": leeway,
            "clock_skew_leeway": leeway,
            **self._token_fields(),
        }
        await self._upsert(
            f"jwt role {self.layout.runner_role}",
            f"auth/{mount}/role/{self.layout.runner_role}",
            role,
        )
        reaper = {
            "role_type": "jwt",
            "bound_audiences": [settings.audience],
            "user_claim": "sub",
            "bound_subject": f"system:serviceaccount:{settings.reaper_namespace}:stigmer-reaper",
            "expiration_leeway": leeway,
            "not_before_leeway": leeway,
            "clock_skew_leeway": leeway,
            **self._token_fields(REAPER_POLICY),
        }
        role_path = f"auth/{mount}/role/{self.layout.reaper_role}"
        await self._upsert(f"jwt role {self.layout.reaper_role}", role_path, reaper)
        return accessor

    async def kubernetes(self, settings: KubernetesSettings) -> str:
        mount = self.layout.kubernetes_mount
        accessor = await self._auth_mount(mount, "kubernetes")
        config: dict[str, Any] = {"kubernetes_host": settings.host}
        if settings.ca_cert:  # Vault outside the cluster: no local service-account CA or JWT
            config["kubernetes_ca_cert"] = settings.ca_cert
            config["disable_local_ca_jwt"] = True
        await self._upsert(f"kubernetes config auth/{mount}/config", f"auth/{mount}/config", config)
        role = {
            "bound_service_account_names": [settings.service_account],
            "bound_service_account_namespaces": ["*"],
            "audience": settings.audience,
            "alias_name_source": "serviceaccount_uid",
            **self._token_fields(),
        }
        await self._upsert(
            f"kubernetes role {self.layout.runner_role}",
            f"auth/{mount}/role/{self.layout.runner_role}",
            role,
        )
        reaper = {
            "bound_service_account_names": ["stigmer-reaper"],
            "bound_service_account_namespaces": [settings.reaper_namespace],
            "audience": settings.audience,
            **self._token_fields(REAPER_POLICY),
        }
        role_path = f"auth/{mount}/role/{self.layout.reaper_role}"
        await self._upsert(f"kubernetes role {self.layout.reaper_role}", role_path, reaper)
        return accessor

    async def approle(self, settings: AppRoleSettings) -> str:
        """One role per tenant; its entity carries ``metadata.tenant`` for the policy."""
        mount = self.layout.approle_mount
        accessor = await self._auth_mount(mount, "approle")
        for tenant in settings.tenants:
            role_name = self.layout.approle_role(tenant)
            role = {
                "bind_secret_id": True,
                "secret_id_ttl": settings.secret_id_ttl,
                "secret_id_num_uses": settings.secret_id_num_uses,
                **self._token_fields(),
            }
            await self._upsert(f"approle role {role_name}", f"auth/{mount}/role/{role_name}", role)
            role_id = str(
                (await self.client.get(f"auth/{mount}/role/{role_name}/role-id"))["data"]["role_id"]
            )
            await self._approle_entity(tenant, role_name, role_id, accessor)
        reaper = {"bind_secret_id": True, "secret_id_ttl": settings.secret_id_ttl,
                  "secret_id_num_uses": settings.secret_id_num_uses,
                  **self._token_fields(REAPER_POLICY)}  # fmt: skip
        role_path = f"auth/{mount}/role/{self.layout.reaper_role}"
        await self._upsert(f"approle role {self.layout.reaper_role}", role_path, reaper)
        return accessor

    async def _approle_entity(
        self, tenant: str, role_name: str, role_id: str, accessor: str
    ) -> None:
        name = role_name
        try:
            entity = (await self.client.get(f"identity/entity/name/{name}"))["data"]
        except NotFound:
            entity = None
        if entity is None or (entity.get("metadata") or {}).get("tenant") != tenant:
            await self.client.post(
                f"identity/entity/name/{name}",
                {"metadata": {"tenant": tenant}, "policies": []},
            )
            self._note(f"identity entity {name}", "created" if entity is None else "updated")
            entity = (await self.client.get(f"identity/entity/name/{name}"))["data"]
        else:
            self._note(f"identity entity {name}", "unchanged")
        aliases = entity.get("aliases") or []
        if any(a.get("mount_accessor") == accessor and a.get("name") == role_id for a in aliases):
            self._note(f"entity alias {name} → approle role id", "unchanged")
            return
        await self.client.post(
            "identity/entity-alias",
            {"name": role_id, "canonical_id": entity["id"], "mount_accessor": accessor},
        )
        self._note(f"entity alias {name} → approle role id", "created")

    async def policies(self, sources: IdentitySources) -> None:
        for name, text in policies.render(self.layout, sources).items():
            await self._upsert(f"policy {name}", f"sys/policies/acl/{name}", {"policy": text})

    async def current_sources(self) -> IdentitySources:
        """Accessors of the runner auth methods already enabled on this server."""
        methods = (await self.client.get("sys/auth")).get("data", {})

        def accessor(mount: str, kind: str) -> str:
            current = methods.get(f"{mount}/") or {}
            return str(current.get("accessor", "")) if current.get("type") == kind else ""

        return IdentitySources(
            jwt=accessor(self.layout.jwt_mount, "jwt"),
            kubernetes=accessor(self.layout.kubernetes_mount, "kubernetes"),
            approle=accessor(self.layout.approle_mount, "approle"),
        )

    async def run(
        self,
        tenants: Sequence[str],
        jwt: JwtSettings,
        kubernetes: KubernetesSettings | None = None,
        approle: AppRoleSettings | None = None,
    ) -> list[Change]:
        for tenant in [*tenants, *(approle.tenants if approle else ())]:
            names.tenant(tenant)
        await self._mount(self.layout.kv_mount, "kv", {"version": "2"})
        await self._mount(self.layout.transit_mount, "transit", {})
        for tenant in dict.fromkeys([*tenants, *(approle.tenants if approle else ())]):
            await self._transit_key(tenant)
        await self.jwt(jwt)
        if kubernetes:
            await self.kubernetes(kubernetes)
        if approle:
            await self.approle(approle)
        await self.policies(await self.current_sources())
        return self.changes


def _same(current: Any, wanted: Any) -> bool:
    """Compare what Vault reads back with what was written (lists, strings, PEM whitespace)."""
    if isinstance(wanted, list) and isinstance(current, list):
        return [_norm(x) for x in current] == [_norm(x) for x in wanted]
    return bool(_norm(current) == _norm(wanted))


def _norm(value: Any) -> Any:
    return value.strip() if isinstance(value, str) else value
