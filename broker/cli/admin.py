"""Commands for Vault admins: ``setup``, ``policy render|apply|check``, ``keys rotate|rewrap``,
``approle role-id|secret-id``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from broker.cli.common import (
    Group,
    add_output,
    add_tenant,
    command,
    emit,
    read_text,
    seconds,
    vault,
)
from broker.cli.dev import identity_key
from broker.dev import DEFAULT_STATE_DIR
from broker.errors import ConfigError

if TYPE_CHECKING:
    from broker.control.setup import AppRoleSettings, Change, JwtSettings, KubernetesSettings
    from broker.policies import IdentitySources
    from broker.vault import VaultClient


def _changes_document(changes: list[Change]) -> dict[str, object]:
    changed = [c for c in changes if c.action != "unchanged"]
    return {
        "changes": [{"item": c.item, "action": c.action} for c in changes],
        "changed": len(changed),
    }


def _print_changes(changes: list[Change], output: str, summary: bool = True) -> None:
    document = _changes_document(changes)
    lines = [f"{c.action:9}  {c.item}" for c in changes]
    if summary:
        changed = document["changed"]
        lines.append(f"setup: {changed} changed" if changed else "setup: nothing to change")
    emit(document, output, "\n".join(lines))


# --- setup ----------------------------------------------------------------------------------


async def _jwt_settings(args: argparse.Namespace, client: VaultClient) -> JwtSettings:
    """Where Vault gets the issuer's keys: PEM files, a JWKS file, a JWKS URL, an OIDC
    discovery URL, or (dev servers, or with --dev) the dev identity key."""
    from broker.control.jwks import pem_keys
    from broker.control.setup import JwtSettings
    from broker.dev import identity

    common = {"issuer": args.jwt_issuer, "audience": args.jwt_audience,
              "reaper_namespace": args.reaper_namespace}  # fmt: skip
    ca = read_text("--jwks-ca-cert", Path(args.jwks_ca_cert)) if args.jwks_ca_cert else ""
    if ca and not (args.jwks_url or args.oidc_discovery_url):
        raise ConfigError("--jwks-ca-cert goes with --jwks-url or --oidc-discovery-url")
    if args.jwt_public_key:
        keys = tuple(read_text("--jwt-public-key", Path(p)) for p in args.jwt_public_key)
        return JwtSettings(public_keys=keys, **common)
    if args.jwks_file:
        text = read_text("--jwks-file", Path(args.jwks_file))
        return JwtSettings(public_keys=pem_keys(text, f"--jwks-file {args.jwks_file}"), **common)
    if args.jwks_url or args.oidc_discovery_url:
        for flag, url in (
            ("--jwks-url", args.jwks_url),
            ("--oidc-discovery-url", args.oidc_discovery_url),
        ):
            if url and not url.startswith(("https://", "http://")):
                raise ConfigError(f"{flag} {url!r}: not an http(s) URL")
        return JwtSettings(jwks_url=args.jwks_url or "", ca_pem=ca,
                           oidc_discovery_url=args.oidc_discovery_url or "", **common)  # fmt: skip
    if not args.dev and not await _is_dev_server(client):
        raise ConfigError(
            "refusing to install the dev identity key into a server that is not a dev server",
            hint="give the cluster's service-account issuer: --jwks-file (kubectl get --raw "
            "/openid/v1/jwks), --jwks-url, --oidc-discovery-url or --jwt-public-key; "
            "--dev accepts the dev key anyway",
        )
    key = identity_key(args)
    if not key.exists():
        identity.create_key(key)
        print(f"created    dev identity key {key}", file=sys.stderr)
    return JwtSettings(public_keys=(identity.public_pem(key),), **common)


async def _is_dev_server(client: VaultClient) -> bool:
    """`bao server -dev` keeps everything in memory; nothing else should."""
    status = await client.request(
        "GET", "sys/seal-status", operation="seal-status", authenticated=False
    )
    return bool(status.get("storage_type") == "inmem")


def _optional_methods(
    args: argparse.Namespace,
) -> tuple[KubernetesSettings | None, AppRoleSettings | None]:
    from broker.control.setup import AppRoleSettings, KubernetesSettings

    kubernetes = None
    if args.kubernetes_host:
        ca = read_text("--kubernetes-ca-cert", Path(args.kubernetes_ca_cert)) if (
            args.kubernetes_ca_cert) else ""  # fmt: skip
        kubernetes = KubernetesSettings(args.kubernetes_host, ca, args.jwt_audience,
                                        reaper_namespace=args.reaper_namespace)  # fmt: skip
    approle = None
    if args.approle_tenant:
        approle = AppRoleSettings(
            tenants=tuple(args.approle_tenant),
            secret_id_ttl=int(seconds(args.secret_id_ttl)),
            secret_id_num_uses=args.secret_id_num_uses,
        )
    return kubernetes, approle


async def setup(args: argparse.Namespace) -> int:
    from broker.config import Layout
    from broker.control.setup import Bootstrap

    async with vault() as client:  # settings first: a bad invocation creates nothing
        kubernetes, approle = _optional_methods(args)
        jwt = await _jwt_settings(args, client)
        changes = await Bootstrap(client, Layout.from_env()).run(
            args.tenant or [], jwt, kubernetes, approle
        )
    _print_changes(changes, args.output)
    return 0


# --- policy -------------------------------------------------------------------------------


async def _sources(args: argparse.Namespace) -> IdentitySources:
    from broker.config import Layout
    from broker.control.setup import Bootstrap
    from broker.policies import IdentitySources

    if args.jwt_accessor or args.kubernetes_accessor or args.approle:
        return IdentitySources(
            jwt=args.jwt_accessor or "",
            kubernetes=args.kubernetes_accessor or "",
            approle="approle" if args.approle else "",
        )
    async with vault() as client:
        return await Bootstrap(client, Layout.from_env()).current_sources()


async def policy_render(args: argparse.Namespace) -> int:
    from broker import policies
    from broker.config import Layout

    rendered = policies.render(Layout.from_env(), await _sources(args))
    text = "\n".join(
        f"# ===== policy {name} =====\n{hcl.rstrip()}\n" for name, hcl in rendered.items()
    )
    emit(rendered, args.output, text)
    return 0


async def policy_apply(args: argparse.Namespace) -> int:
    from broker.config import Layout
    from broker.control.setup import Bootstrap

    async with vault() as client:
        bootstrap = Bootstrap(client, Layout.from_env())
        await bootstrap.policies(await bootstrap.current_sources())
    _print_changes(bootstrap.changes, args.output, summary=False)
    return 0


def _runner_jwt(args: argparse.Namespace) -> str:
    from broker.dev import identity

    if args.runner_jwt:
        return read_text("--runner-jwt", Path(args.runner_jwt)).strip()
    key = identity_key(args)
    if not key.is_file():
        raise ConfigError(
            f"no --runner-jwt and no dev identity key at {key}: pass a service-account "
            f"token from a runner pod in namespace {args.tenant}"
        )
    return identity.mint_token(key, args.tenant, pod="policy-check", ttl_seconds=300)


async def policy_check(args: argparse.Namespace) -> int:
    from broker import names
    from broker.config import Layout
    from broker.control.policy_check import PolicyCheck

    names.tenant(args.tenant)
    names.tenant(args.other_tenant)
    if args.tenant == args.other_tenant:
        raise ConfigError("--other-tenant must differ from --tenant")
    async with vault() as client:
        report = await PolicyCheck(client, Layout.from_env()).run(
            args.tenant, args.other_tenant, _runner_jwt(args)
        )
    ok_line = "policy check: every cell as expected"
    emit(report.as_json(), args.output, report.table() + ("\n" + ok_line if report.ok else ""))
    for cell in (c for c in report.cells if not c.ok):
        print(f"MISMATCH {cell.identity} {cell.operation} ({cell.scope}): expected "
              f"{cell.expected}, got {cell.got}", file=sys.stderr)  # fmt: skip
    return 0 if report.ok else 1


# --- keys and approle -------------------------------------------------------------------------


async def keys_rotate(args: argparse.Namespace) -> int:
    from broker import names
    from broker.config import Layout
    from broker.control.keys import KeyManager

    layout = Layout.from_env()
    async with vault() as client:
        version = await KeyManager(client, layout).rotate(names.tenant(args.tenant))
    key = layout.transit_key(args.tenant)
    emit({"key": key, "latest_version": version}, args.output,
         f"rotated {key}: latest version {version}")  # fmt: skip
    return 0


async def keys_rewrap(args: argparse.Namespace) -> int:
    from broker import names
    from broker.config import Layout
    from broker.control.keys import KeyManager

    async with vault() as client:
        manager = KeyManager(client, Layout.from_env())
        report = await manager.rewrap(names.tenant(args.tenant), args.min_decryption_version)
    text = (
        f"rewrapped {report.rewrapped} secrets in {report.documents} documents of tenant "
        f"{report.tenant} to key version {report.latest_version} "
        f"({report.retries} concurrent edits retried)"
    )
    if report.min_decryption_version is not None:
        text += f"\nmin_decryption_version raised to {report.min_decryption_version}"
    emit(report.as_json(), args.output, text)
    return 0


async def approle_role_id(args: argparse.Namespace) -> int:
    from broker.config import Layout
    from broker.control import approle

    async with vault() as client:
        role_id = await approle.role_id(client, Layout.from_env(), args.tenant)
    emit({"role_id": role_id}, args.output, role_id)
    return 0


async def approle_secret_id(args: argparse.Namespace) -> int:
    """A response-wrapped secret_id: only the wrapping token is printed, never the secret_id."""
    from broker.config import Layout
    from broker.control import approle

    ttl = int(seconds(args.wrap_ttl))
    async with vault() as client:
        token = await approle.wrapped_secret_id(client, Layout.from_env(), args.tenant, ttl)
    emit({"wrapping_token": token}, args.output, token)
    return 0


# --- flags ------------------------------------------------------------------------------------


def _setup_flags(p: argparse.ArgumentParser) -> None:
    from broker.dev import DEFAULT_AUDIENCE, DEFAULT_ISSUER

    p.add_argument("--tenant", action="append", help="create the tenant's Transit key")
    keys = p.add_mutually_exclusive_group()
    keys.add_argument(
        "--jwt-public-key",
        action="append",
        metavar="PEM_FILE",
        help="service-account issuer public key (default on a dev server: the dev identity's)",
    )
    keys.add_argument(
        "--jwks-file",
        metavar="FILE",
        help="the issuer's keys as JWKS, e.g. `kubectl get --raw /openid/v1/jwks`",
    )
    keys.add_argument(
        "--jwks-url", metavar="URL", help="Vault fetches the issuer's JWKS itself (rotation-proof)"
    )
    keys.add_argument(
        "--oidc-discovery-url",
        metavar="URL",
        help="the issuer's OIDC discovery base URL (Vault reads .well-known/openid-configuration)",
    )
    p.add_argument(
        "--jwks-ca-cert",
        metavar="PEM_FILE",
        help="CA of the --jwks-url/--oidc-discovery-url server",
    )
    p.add_argument(
        "--dev",
        action="store_true",
        help="accept the dev identity key on a server that is not a dev server",
    )
    p.add_argument("--jwt-issuer", default=DEFAULT_ISSUER, help="the tokens' iss claim")
    p.add_argument("--jwt-audience", default=DEFAULT_AUDIENCE, help="the tokens' aud claim")
    p.add_argument(
        "--identity-key", help="dev identity private key to use without --jwt-public-key"
    )
    p.add_argument("--state-dir", default=DEFAULT_STATE_DIR, help=argparse.SUPPRESS)
    p.add_argument(
        "--kubernetes-host", metavar="URL", help="also enable Kubernetes auth (API server URL)"
    )
    p.add_argument("--kubernetes-ca-cert", metavar="PEM_FILE")
    p.add_argument(
        "--approle-tenant",
        action="append",
        metavar="T",
        help="also enable AppRole with a runner role for tenant T (outside Kubernetes)",
    )
    p.add_argument(
        "--reaper-namespace",
        default="stigmer-system",
        help="the namespace whose stigmer-reaper service account may log in as reaper",
    )
    p.add_argument("--secret-id-ttl", default="10m", help="AppRole secret_id TTL")
    p.add_argument("--secret-id-num-uses", type=int, default=1, help="AppRole secret_id uses")
    add_output(p)  # fmt: skip


def _register_policy(commands: Group) -> None:
    policy = commands.add_parser("policy", help="Vault policies").add_subparsers(
        dest="policy_command", required=True, metavar="COMMAND"
    )
    p = command(
        policy,
        "render",
        policy_render,
        "print the policies for this layout",
        "stigmer-broker policy render --jwt-accessor auth_jwt_12ab --approle",
    )
    p.add_argument("--jwt-accessor", help="render offline with this JWT auth mount accessor")
    p.add_argument("--kubernetes-accessor", help="…and this Kubernetes auth mount accessor")
    p.add_argument("--approle", action="store_true", help="…and the AppRole block")
    add_output(p)
    p = command(
        policy, "apply", policy_apply, "write the policies to Vault", "stigmer-broker policy apply"
    )
    add_output(p)
    p = command(
        policy,
        "check",
        policy_check,
        "prove the allowed/denied matrix on a live Vault",
        "stigmer-broker policy check --tenant acme --other-tenant beta",
    )
    p.add_argument("--tenant", required=True, help="the runner identity's tenant")
    p.add_argument("--other-tenant", required=True, help="a second tenant it must not reach")
    p.add_argument("--runner-jwt", metavar="FILE", help="service-account JWT from --tenant")
    p.add_argument("--state-dir", default=DEFAULT_STATE_DIR, help="where `dev up` keeps its key")
    p.add_argument("--identity-key", help="dev identity key to mint the runner JWT")
    add_output(p)  # fmt: skip


def _register_keys(commands: Group) -> None:
    keys = commands.add_parser("keys", help="Transit keys").add_subparsers(
        dest="keys_command", required=True, metavar="COMMAND"
    )
    p = command(
        keys,
        "rotate",
        keys_rotate,
        "add a new version to a tenant's Transit key",
        "stigmer-broker keys rotate --tenant acme",
    )
    add_tenant(p)
    add_output(p)
    p = command(
        keys,
        "rewrap",
        keys_rewrap,
        "re-encrypt stored secrets to the newest key version",
        "stigmer-broker keys rewrap --tenant acme --min-decryption-version",
    )
    add_tenant(p)
    p.add_argument(
        "--min-decryption-version",
        action="store_true",
        help="also rewrap live contexts, then refuse older key versions",
    )
    add_output(p)  # fmt: skip


def _register_approle(commands: Group) -> None:
    approle = commands.add_parser("approle", help="AppRole credentials for runners").add_subparsers(
        dest="approle_command", required=True, metavar="COMMAND"
    )
    p = command(
        approle,
        "role-id",
        approle_role_id,
        "print a tenant's runner role_id",
        "stigmer-broker approle role-id --tenant acme > role-id",
    )
    add_tenant(p)
    add_output(p)
    p = command(
        approle,
        "secret-id",
        approle_secret_id,
        "print a wrapping token for a secret_id",
        "stigmer-broker approle secret-id --tenant acme --wrap-ttl 5m > secret-id",
    )
    add_tenant(p)
    p.add_argument("--wrap-ttl", default="5m", help="lifetime of the wrapping token")
    add_output(p)  # fmt: skip


COMMANDS = ("setup", "policy", "keys", "approle")  # what register() adds


def register(commands: Group) -> None:
    p = command(
        commands,
        "setup",
        setup,
        "configure a Vault for the broker (idempotent)",
        "stigmer-broker setup --tenant acme --jwt-public-key sa.pub --jwt-issuer URL",
    )
    _setup_flags(p)
    _register_policy(commands)
    _register_keys(commands)
    _register_approle(commands)  # fmt: skip
