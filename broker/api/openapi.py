"""The OpenAPI 3.1 document, built from the same models the API validates with; ``openapi.json``
at the repository's root is this document, checked by a test (``make openapi`` rewrites it)."""

from __future__ import annotations

from typing import Any

from pydantic.json_schema import models_json_schema

from broker import __version__
from broker.api import routes
from broker.model import (
    Agent,
    AgentExecution,
    AgentInstance,
    Environment,
    ExecutionContext,
    McpServer,
    Workflow,
    WorkflowExecution,
    WorkflowInstance,
)

REF = "#/components/schemas/{model}"
JSON = "application/json"
PROBLEM = "application/problem+json"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": REF.format(model=name)}


def _schemas() -> dict[str, Any]:
    models = [Environment, Agent, Workflow, AgentInstance, WorkflowInstance, AgentExecution,
              WorkflowExecution, ExecutionContext, McpServer]  # fmt: skip
    _, top = models_json_schema(
        [(m, "validation") for m in models], by_alias=False, ref_template=REF
    )
    schemas: dict[str, Any] = dict(top.get("$defs", {}))
    schemas["Problem"] = {
        "type": "object",
        "description": "RFC 9457 problem details; `errors` for invalid input, one per field.",
        "required": ["type", "title", "status", "detail"],
        "properties": {
            "type": {"type": "string"}, "title": {"type": "string"},
            "status": {"type": "integer"}, "detail": {"type": "string"},
            "hint": {"type": "string"}, "operation": {"type": "string"},
            "errors": {"type": "array", "items": {
                "type": "object", "required": ["pointer", "detail"],
                "properties": {"pointer": {"type": "string", "description": "RFC 6901"},
                               "detail": {"type": "string"}}}},
        },
    }  # fmt: skip
    schemas["ExecutionRequest"] = {
        "type": "object",
        "description": "What `stigmer-broker execution create` takes, as one body "
        "(runtimeEnv, allowSecretInArgs and allowEnvNames are accepted too).",
        "required": ["template"],
        "additionalProperties": False,
        "properties": {
            "template": {"oneOf": [_ref("Agent"), _ref("Workflow")]},
            "instance": {"oneOf": [_ref("AgentInstance"), _ref("WorkflowInstance")]},
            "execution": {"oneOf": [_ref("AgentExecution"), _ref("WorkflowExecution")],
                          "description": "its spec.runtime_env is the execution's layer"},
            "runtime_env": {"type": "object", "additionalProperties": _ref("ExecutionValue"),
                            "description": "on top of the execution's runtime_env, as the "
                            "CLI's --env/--secret are; a secret stays secret"},
            "mcp_servers": {"type": "array", "items": _ref("McpServer"),
                            "description": "McpServers the template's mcp_server_usages name"},
            "environments": {"type": "array", "items": {"type": "string"},
                             "description": "more Environments, layered after the instance's"},
            "ttl": {"type": "string", "default": "1h", "examples": ["15m", "1h"]},
            "id": {"type": "string", "description": "default: a new random id"},
            "allow_secret_in_args": {"type": "boolean", "default": False},
            "allow_env_names": {"type": "array", "items": {"type": "string"}},
        },
    }  # fmt: skip
    schemas["IssuedExecution"] = {
        "type": "object",
        "required": ["id", "tenant", "expires_at", "variables"],
        "properties": {
            "id": {"type": "string"}, "tenant": {"type": "string"},
            "context_path": {"type": "string"},
            "expires_at": {"type": "string", "format": "date-time"},
            "variables": {"type": "object", "additionalProperties": {
                "type": "object", "properties": {"secret": {"type": "boolean"}}}},
        },
    }  # fmt: skip
    schemas["EnvironmentNames"] = {
        "type": "object", "required": ["names"],
        "properties": {"names": {"type": "array", "items": {"type": "string"}},
                       "next": {"type": "string", "description": "pass as ?after= for more"}},
    }  # fmt: skip
    return schemas


def _errors(*statuses: int) -> dict[str, Any]:
    reasons = {400: "bad request", 401: "no Vault token", 403: "Vault denied the operation",
               404: "not found", 409: "exists or changed concurrently",
               412: "If-Match names a stale version", 413: "body too large",
               422: "invalid input (field errors)",
               503: "Vault unavailable (Retry-After)"}  # fmt: skip
    return {
        str(s): {"description": reasons[s], "content": {PROBLEM: {"schema": _ref("Problem")}}}
        for s in statuses
    }


def _json(schema: dict[str, Any], description: str, **headers: str) -> dict[str, Any]:
    answer: dict[str, Any] = {"description": description, "content": {JSON: {"schema": schema}}}
    if headers:
        answer["headers"] = {k: {"schema": {"type": "string"}, "description": v}
                             for k, v in headers.items()}  # fmt: skip
    return answer


def _parameters(path: str) -> list[dict[str, Any]]:
    return [
        {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
        for name in ("tenant", "name", "id") if "{" + name + "}" in path
    ]  # fmt: skip


def _paths() -> dict[str, Any]:
    common = (401, 403, 422, 503)
    environment = {
        "put": {
            "summary": "Create or replace an Environment (secret values encrypted on arrival)",
            "parameters": [
                {"name": "If-Match", "in": "header", "schema": {"type": "string"},
                 "description": "the ETag a GET returned (or *): replace exactly that version"},
                {"name": "replace", "in": "query", "schema": {"type": "boolean"},
                 "description": "without If-Match: replace whatever version is there"},
            ],
            "requestBody": {"required": True, "content": {JSON: {"schema": _ref("Environment")}}},
            "responses": {
                "200": _json(_ref("Environment"), "replaced (secrets masked)",
                             ETag="its new version"),
                "201": _json(_ref("Environment"), "created (secrets masked)", ETag="its version"),
                **_errors(400, 409, 412, 413, *common),
            },
        },
        "get": {
            "summary": "An Environment, secrets masked",
            "responses": {"200": _json(_ref("Environment"), "the Environment, secret values "
                                        "`<secret>`", ETag="its version"),
                          **_errors(404, *common)},
        },
        "delete": {
            "summary": "Destroy an Environment (every version)",
            "responses": {"204": {"description": "destroyed"}, **_errors(404, *common)},
        },
    }  # fmt: skip
    environments = {"get": {
        "summary": "Environment names, paged",
        "parameters": [
            {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1,
                                                          "maximum": routes.MAX_PAGE}},
            {"name": "after", "in": "query", "schema": {"type": "string"}},
        ],
        "responses": {"200": _json(_ref("EnvironmentNames"), "names"), **_errors(*common)},
    }}  # fmt: skip
    executions = {"post": {
        "summary": "Resolve and issue an ExecutionContext (never returns a value)",
        "requestBody": {"required": True,
                        "content": {JSON: {"schema": _ref("ExecutionRequest")}}},
        "responses": {"201": _json(_ref("IssuedExecution"), "issued", Location="its URL"),
                      **_errors(400, 413, *common)},
    }}  # fmt: skip
    execution = {
        "get": {"summary": "An execution's context, secrets masked",
                "responses": {"200": _json(_ref("ExecutionContext"),
                                           "the context, secret values `<secret>`"),
                              **_errors(404, *common)}},
        "delete": {"summary": "End an execution (destroy its context)",
                   "responses": {"204": {"description": "ended"}, **_errors(404, *common)}},
    }  # fmt: skip
    paths: dict[str, dict[str, Any]] = {
        routes.ENVIRONMENT: environment, routes.ENVIRONMENTS: environments,
        routes.EXECUTIONS: executions, routes.EXECUTION: execution,
    }  # fmt: skip
    for path, operations in paths.items():
        for operation in operations.values():
            operation["parameters"] = _parameters(path) + operation.get("parameters", [])
    probes = {"/healthz": "the process is up", "/readyz": "Vault is reachable and unsealed",
              "/metrics": "Prometheus metrics", "/openapi.json": "this document"}  # fmt: skip
    for path, summary in probes.items():
        paths[path] = {"get": {"summary": summary, "security": [],
                               "responses": {"200": {"description": "ok"}}}}  # fmt: skip
    return paths


def document() -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "stigmer-broker control API",
            "version": __version__,
            "description": "Environments and executions for Stigmer's backend. Every request "
            "carries the caller's own Vault token; Vault's policies decide what it may do.",
        },
        "security": [{"vaultToken": []}, {"bearer": []}],
        "paths": _paths(),
        "components": {
            "schemas": _schemas(),
            "securitySchemes": {
                "vaultToken": {"type": "apiKey", "in": "header", "name": "X-Vault-Token"},
                "bearer": {"type": "http", "scheme": "bearer"},
            },
        },
    }
