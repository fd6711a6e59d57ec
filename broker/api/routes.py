"""The handlers. Each acts with the caller's Vault token, so Vault's policies decide what the
caller may do; the server adds no privilege of its own (no confused deputy)."""

from __future__ import annotations

import contextlib
from typing import Any

from aiohttp import web

from broker import names
from broker.api import bodies, problems
from broker.config import Layout
from broker.control.environments import EnvironmentStore, masked
from broker.control.executions import ExecutionIssuer
from broker.errors import Conflict, ValidationError
from broker.vault import VaultClient

BASE_CLIENT = web.AppKey("base_client", VaultClient)
LAYOUT = web.AppKey("layout", Layout)
MAX_PAGE = 1000

ENVIRONMENTS = "/v1/tenants/{tenant}/environments"
ENVIRONMENT = "/v1/tenants/{tenant}/environments/{name}"
EXECUTIONS = "/v1/tenants/{tenant}/executions"
EXECUTION = "/v1/tenants/{tenant}/executions/{id}"


class Unauthenticated(web.HTTPUnauthorized):
    pass


def caller(request: web.Request) -> VaultClient:
    """A client acting with the caller's token (``X-Vault-Token`` or ``Authorization: Bearer``)."""
    token = request.headers.get("X-Vault-Token", "")
    scheme, _, credentials = request.headers.get("Authorization", "").partition(" ")
    if not token and scheme.lower() == "bearer":
        token = credentials.strip()
    if not token or not token.isprintable() or len(token) > 4096:
        raise Unauthenticated()
    return request.app[BASE_CLIENT].with_token(token)


def _tenant(request: web.Request) -> str:
    return names.tenant(request.match_info["tenant"])


def _etag(version: int) -> str:
    return f'"{version}"'


def _if_match(header: str) -> int | None:
    """The version an ``If-Match`` names (``*``: None, any existing version; an ETag this API
    never returns: 0, which matches nothing, so the PUT gets 412)."""
    if header.strip() == "*":
        return None
    value = header.strip().removeprefix("W/").strip('"')
    return int(value) if value.isdigit() and len(value) < 19 else 0


# --- environments ------------------------------------------------------------------------------


async def put_environment(request: web.Request) -> web.Response:
    tenant, name = _tenant(request), request.match_info["name"]
    environment = bodies.environment(await request.read(), name)
    store = EnvironmentStore(caller(request), request.app[LAYOUT])
    header = request.headers.get("If-Match")
    if header is not None:
        wanted = _if_match(header)  # a version is checked by the write's check-and-set itself
        version = await store.version(tenant, name) if wanted is None else wanted
        written = 0  # stays 0 for "*" with nothing there, or an ETag this API never returned
        if version:
            with contextlib.suppress(Conflict):
                written = await store.replace(tenant, environment, version)
        if not written:
            return _stale(name, await store.version(tenant, name))
        status = 200
    elif request.query.get("replace") == "true":
        current = await store.version(tenant, name)
        try:
            written = await store.replace(tenant, environment, current)
        except Conflict:
            return problems.problem(409, f"Environment {name}: changed concurrently; retry")
        status = 201 if current == 0 else 200
    else:
        try:
            written = await store.replace(tenant, environment, 0)
        except Conflict:
            return problems.problem(
                409, f"Environment {name}: already exists in tenant {tenant}",
                hint="replace it with If-Match: <its ETag> (from GET), or ?replace=true",
            )  # fmt: skip
        status = 201
    return web.json_response(masked(environment), status=status,
                             headers={"ETag": _etag(written)})  # fmt: skip


def _stale(name: str, current: int) -> web.Response:
    response = problems.problem(
        412, f"Environment {name}: If-Match does not name its current version; nothing changed",
        hint="GET it again, apply your change to what it returns, PUT with its ETag",
    )  # fmt: skip
    if current:
        response.headers["ETag"] = _etag(current)
    return response


async def get_environment(request: web.Request) -> web.Response:
    tenant, name = _tenant(request), names.environment_name(request.match_info["name"])
    store = EnvironmentStore(caller(request), request.app[LAYOUT])
    environment, version = await store.read(tenant, name)
    return web.json_response(masked(environment), headers={"ETag": _etag(version)})


async def delete_environment(request: web.Request) -> web.Response:
    tenant, name = _tenant(request), request.match_info["name"]
    await EnvironmentStore(caller(request), request.app[LAYOUT]).delete(tenant, name)
    return web.Response(status=204)


async def list_environments(request: web.Request) -> web.Response:
    tenant = _tenant(request)
    limit = _limit(request.query.get("limit", "100"))
    after = request.query.get("after", "")
    listed = await EnvironmentStore(caller(request), request.app[LAYOUT]).list(tenant)
    page = [n for n in listed if n > after][:limit]
    body: dict[str, Any] = {"names": page}
    if len(page) == limit and page[-1] != listed[-1]:
        body["next"] = page[-1]
    return web.json_response(body)


def _limit(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= MAX_PAGE:
        raise ValidationError("query", [f"limit: must be 1 to {MAX_PAGE}"])
    return int(text)


# --- executions --------------------------------------------------------------------------------


async def post_execution(request: web.Request) -> web.Response:
    tenant = _tenant(request)
    wanted = bodies.execution(await request.read())
    issued = await ExecutionIssuer(caller(request), request.app[LAYOUT]).create(
        tenant,
        wanted.template,
        wanted.instance,
        environments=wanted.environments,
        runtime_env=wanted.runtime,
        ttl=wanted.ttl,
        execution_id=wanted.execution_id,
        allow_secret_in_args=wanted.allow_secret_in_args,
        allowed_env_names=wanted.allow_env_names,
        execution=wanted.execution,
        mcp_servers=wanted.mcp_servers,
    )
    location = EXECUTION.format(tenant=tenant, id=issued.execution_id)
    return web.json_response(issued.as_json(), status=201, headers={"Location": location})


async def get_execution(request: web.Request) -> web.Response:
    tenant, execution_id = _tenant(request), names.execution_id(request.match_info["id"])
    shown = await ExecutionIssuer(caller(request), request.app[LAYOUT]).show(tenant, execution_id)
    return web.json_response(shown)


async def delete_execution(request: web.Request) -> web.Response:
    tenant, execution_id = _tenant(request), names.execution_id(request.match_info["id"])
    await ExecutionIssuer(caller(request), request.app[LAYOUT]).end(tenant, execution_id)
    return web.Response(status=204)


ROUTES: list[tuple[str, str, Any]] = [
    ("PUT", ENVIRONMENT, put_environment),
    ("GET", ENVIRONMENT, get_environment),
    ("DELETE", ENVIRONMENT, delete_environment),
    ("GET", ENVIRONMENTS, list_environments),
    ("POST", EXECUTIONS, post_execution),
    ("GET", EXECUTION, get_execution),
    ("DELETE", EXECUTION, delete_execution),
]
