"""`--mcp-format`: the MCP config in more client shapes, from `run` and from the sidecar, with
everything the agent declared (timeout_seconds, enabled_tools) kept in Stigmer's own shape."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from broker.vault import VaultClient
from tests.conftest import Vault, run_as_runner, start_sidecar
from tests.factories import issue_secrets

CANARY = "cnry-mcpfmt-51b2-do-not-leak"
SERVERS = [
    {"name": "github", "stdio": {"command": "npx", "args": ["-y", "server-github"],
                                 "env_placeholders": {"GITHUB_TOKEN": "${TOKEN_0}"}},
     "enabled_tools": ["create_issue", "list_issues"]},
    {"name": "review", "http": {"url": "https://mcp.example.com/review",
                                "headers": {"Authorization": "Bearer ${TOKEN_0}"},
                                "timeout_seconds": 90}},
]  # fmt: skip


def check_shapes(directory: Path) -> None:
    claude = json.loads((directory / "mcp.json").read_text())
    assert set(claude) == {"mcpServers"}
    assert claude["mcpServers"]["github"]["env"]["GITHUB_TOKEN"] == CANARY
    vscode = json.loads((directory / "mcp.vscode.json").read_text())
    assert vscode["servers"]["github"]["type"] == "stdio"
    assert vscode["servers"]["github"]["command"] == "npx"
    assert vscode["servers"]["review"] == {
        "type": "http", "url": "https://mcp.example.com/review",
        "headers": {"Authorization": f"Bearer {CANARY}"}}  # fmt: skip
    native = {s["name"]: s for s in json.loads((directory / "mcp.stigmer.json").read_text())[
        "mcp_servers"]}  # fmt: skip
    assert native["github"]["enabled_tools"] == ["create_issue", "list_issues"]
    assert native["review"]["http"]["timeout_seconds"] == 90
    assert native["review"]["http"]["headers"]["Authorization"] == f"Bearer {CANARY}"
    manifest = json.loads((directory / "manifest.json").read_text())
    assert manifest["mcp_configs"] == {"mcpservers": "mcp.json", "vscode": "mcp.vscode.json",
                                       "stigmer": "mcp.stigmer.json"}  # fmt: skip
    assert set(manifest["files"]) >= {"mcp.json", "mcp.vscode.json", "mcp.stigmer.json"}
    assert CANARY not in json.dumps(manifest)


async def test_run_writes_every_shape_asked_for(
    vault: Vault, admin: VaultClient, tenant: str, tmp_path: Path, shm: Path
) -> None:
    await issue_secrets(admin, vault.layout, tenant, "fmt-run", {"TOKEN_0": (CANARY, True)},
                        servers=SERVERS)  # fmt: skip
    check = (f"import os, shutil; shutil.copytree(os.path.dirname("
             f"os.environ['STIGMER_MCP_CONFIG']), {str(shm / 'seen')!r})")  # fmt: skip
    result = run_as_runner(vault, tenant, "fmt-run", shm / "out", vault.jwt_for(tenant, tmp_path),
                           check, "--mcp-format", "vscode", "--mcp-format", "stigmer")  # fmt: skip
    assert result.returncode == 0, result.stderr
    check_shapes(shm / "seen")
    assert CANARY not in result.stderr


async def test_the_sidecar_writes_the_shapes_and_only_mcp_json_by_default(
    vault: Vault, admin: VaultClient, tenant: str, tmp_path: Path, shm: Path
) -> None:
    for execution_id in ("fmt-1", "fmt-2"):
        await issue_secrets(admin, vault.layout, tenant, execution_id,
                            {"TOKEN_0": (CANARY, True)}, servers=SERVERS)  # fmt: skip
    sidecar = await start_sidecar(vault, tenant, tmp_path, shm, "--mcp-format", "vscode",
                                  "--mcp-format", "stigmer")  # fmt: skip
    try:
        prepared = await asyncio.to_thread(sidecar.client.prepare, "fmt-1")
        check_shapes(prepared.env_file.parent)
        await asyncio.to_thread(sidecar.client.end, "fmt-1")
        assert not prepared.env_file.parent.exists()
    finally:
        assert sidecar.stop() == 0
    plain = await start_sidecar(vault, tenant, tmp_path, shm, name="b")
    try:
        prepared = await asyncio.to_thread(plain.client.prepare, "fmt-2")
        directory = prepared.env_file.parent
        assert sorted(p.name for p in directory.iterdir()) == [
            "env", "env.json", "manifest.json", "mcp.json"]  # fmt: skip
        manifest = json.loads((directory / "manifest.json").read_text())
        assert manifest["mcp_configs"] == {"mcpservers": "mcp.json"}
        await asyncio.to_thread(plain.client.end, "fmt-2")
    finally:
        assert plain.stop() == 0
