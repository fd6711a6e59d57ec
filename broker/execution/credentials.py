"""The runner's own identity: how it logs in to Vault (JWT, Kubernetes, AppRole, or a token).

Credentials are read from files, never from argv or the environment; the JWT file is re-read on
every login because the kubelet rotates projected service-account tokens.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from broker.config import Layout
from broker.errors import ConfigError
from broker.records import record
from broker.vault import Login, VaultClient, approle_login, jwt_login, unwrap_secret_id

AuthMethod = Literal["jwt", "kubernetes", "approle", "token"]
KUBERNETES_TOKEN_PATH = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")


@record(frozen=True)
class Credentials:
    method: AuthMethod = "jwt"
    jwt_file: Path = KUBERNETES_TOKEN_PATH
    role: str = ""  # default: stigmer-runner (jwt, kubernetes), stigmer-runner-<tenant> (approle)
    role_id_file: Path | None = None
    secret_id_file: Path | None = None


def read_credential_file(what: str, path: Path) -> str:
    """A credential from a file, stripped; an empty or unreadable file is a ConfigError."""
    try:
        text = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"{what} {path}: cannot read ({exc.strerror})") from None
    if not text:
        raise ConfigError(f"{what} {path}: the file is empty")
    return text


async def login(
    client: VaultClient, layout: Layout, credentials: Credentials, tenant: str
) -> Login:
    """One login with the runner's identity; every successful login mints a token."""
    method = credentials.method
    if method in ("jwt", "kubernetes"):
        mount = layout.jwt_mount if method == "jwt" else layout.kubernetes_mount
        role = credentials.role or layout.runner_role
        jwt = read_credential_file("JWT file", credentials.jwt_file)
        return await jwt_login(client, mount, role, jwt, method=method)
    if method == "approle":
        if credentials.role_id_file is None or credentials.secret_id_file is None:
            raise ConfigError("AppRole login needs a role_id file and a wrapped secret_id file")
        role = credentials.role or layout.approle_role(tenant)  # one role per tenant
        role_id = read_credential_file("role_id file", credentials.role_id_file)
        wrapped = read_credential_file("secret_id file", credentials.secret_id_file)
        secret_id = await unwrap_secret_id(client, wrapped, layout.approle_mount, role)
        return await approle_login(client, layout.approle_mount, role_id, secret_id)
    raise ConfigError(f"auth method {method!r} does not log in (it uses a given token)")
