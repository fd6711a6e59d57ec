"""Rendering: file formats, modes, tmpfs refusal, symlink safety, wipe."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

import pytest

from broker.envfile import write as dotenv
from broker.errors import RenderError
from broker.model import McpServerDefinition
from broker.render.files import contents, render
from broker.render.formats import mcp_config
from broker.render.outdir import ExecutionDirectory, OutputRoot, filesystem_type, is_memory_backed
from broker.render.wipe import wipe
from broker.resolve import ServerConfig, Variable

pytestmark = pytest.mark.unit


def prepare_directory(out: Path, execution_id: str, allow_disk: bool = False) -> ExecutionDirectory:
    root = OutputRoot(out, allow_disk)
    root.check()
    return root.create(execution_id)


def write(
    directory: ExecutionDirectory, variables: dict[str, Variable], servers: list[ServerConfig]
) -> None:
    render(directory, contents(directory.path.name, "acme", variables, servers, None))


def test_dev_shm_is_memory_backed_and_tmp_path_is_not(tmp_path: Path) -> None:
    assert is_memory_backed(Path("/dev/shm"))
    assert filesystem_type(tmp_path) not in {"tmpfs", "ramfs"} or pytest.fail(
        "tmp_path is on tmpfs here; the disk refusal test needs a disk-backed directory"
    )


def test_disk_backed_out_refused_unless_allowed(tmp_path: Path) -> None:
    with pytest.raises(RenderError, match=r"disk-backed.*--allow-disk"):
        prepare_directory(tmp_path / "out", "exec-1")
    assert not (tmp_path / "out" / "exec-1").exists()
    directory = prepare_directory(tmp_path / "out", "exec-1", allow_disk=True)
    assert stat.S_IMODE(directory.path.stat().st_mode) == 0o700


def test_existing_execution_directory_is_refused(shm: Path) -> None:
    prepare_directory(shm, "exec-1")
    with pytest.raises(RenderError, match="already exists"):
        prepare_directory(shm, "exec-1")


def _servers() -> list[ServerConfig]:
    return [
        McpServerDefinition.model_validate(s).model_dump(mode="json")
        for s in (
            {
                "name": "github",
                "stdio": {
                    "command": "npx",
                    "args": ["-y", "srv"],
                    "env_placeholders": {"GITHUB_TOKEN": "ghp_1"},
                    "working_dir": "/app",
                },
            },
            {
                "name": "api",
                "http": {
                    "url": "https://mcp.example.com/api?v=1",
                    "headers": {"Authorization": "Bearer t"},
                    "query_params": {"region": "us east", "env": "prod&x"},
                },
            },
            {
                "name": "custom",
                "docker": {
                    "image": "ghcr.io/o/mcp:latest",
                    "args": ["--verbose"],
                    "env_placeholders": {"API_KEY": "k1", "DB": "d1"},
                    "volumes": [
                        {"host_path": "/h/data", "container_path": "/mnt/data"},
                        {"host_path": "/h/cfg", "container_path": "/etc/mcp", "read_only": True},
                    ],
                    "network": "mcp-network",
                    "ports": [{"host_port": 8080, "container_port": 80, "protocol": "tcp"}],
                    "container_name": "my-mcp",
                },
            },
        )
    ]


def test_mcp_json_shapes() -> None:
    config = mcp_config(_servers())["mcpServers"]
    assert config["github"] == {
        "command": "npx",
        "args": ["-y", "srv"],
        "env": {"GITHUB_TOKEN": "ghp_1"},
        "cwd": "/app",
    }
    assert config["api"] == {
        "type": "http",
        "url": "https://mcp.example.com/api?v=1&env=prod%26x&region=us+east",
        "headers": {"Authorization": "Bearer t"},
    }
    assert config["custom"] == {
        "command": "docker",
        "args": [
            "run", "-i", "--rm",
            "-e", "API_KEY", "-e", "DB",
            "-v", "/h/data:/mnt/data", "-v", "/h/cfg:/etc/mcp:ro",
            "--network", "mcp-network",
            "-p", "8080:80/tcp",
            "--name", "my-mcp",
            "ghcr.io/o/mcp:latest", "--verbose",
        ],
        "env": {"API_KEY": "k1", "DB": "d1"},
    }  # fmt: skip
    assert "k1" not in json.dumps(config["custom"]["args"])


def test_dotenv_round_trips_through_a_shell() -> None:
    values = {"A": "plain", "B": 'it\'s $HOME `x` "q"', "C": "multi\nline", "D": "back\\slash"}
    text = dotenv(values)
    script = f'set -a\n{text}\nprintf \'%s\\0\' "$A" "$B" "$C" "$D"'
    out = subprocess.run(["bash", "-c", script], capture_output=True, check=True, env={}).stdout
    assert out.decode().split("\0")[:4] == [values[k] for k in "ABCD"]


def test_render_writes_four_read_only_files(shm: Path) -> None:
    directory = prepare_directory(shm, "exec-9")
    variables = {
        "TOKEN": Variable("s3cr3t-value", True, False, "x"),
        "MODE": Variable("fast", False, False, "x"),
    }
    files = render(directory, contents("exec-9", "acme", variables, _servers(), None))
    assert sorted(os.listdir(directory.path)) == ["env", "env.json", "manifest.json", "mcp.json"]
    for name in os.listdir(directory.path):
        assert stat.S_IMODE((directory.path / name).stat().st_mode) == 0o400
    assert json.loads(files.env_json.read_text()) == {"MODE": "fast", "TOKEN": "s3cr3t-value"}
    manifest = json.loads(files.manifest.read_text())
    assert manifest["variables"] == {"MODE": {"secret": False}, "TOKEN": {"secret": True}}
    assert "s3cr3t-value" not in files.manifest.read_text()
    assert set(manifest["files"]) == {"env", "env.json", "mcp.json"}


def test_planted_symlink_cannot_redirect_a_write(shm: Path, tmp_path: Path) -> None:
    target = tmp_path / "stolen"
    variables = {"A": Variable("v", True, False, "x")}
    # A link where a file will go is replaced by the rename, never written through.
    directory = prepare_directory(shm, "exec-s")
    os.symlink(target, directory.path / "env.json")
    write(directory, variables, [])
    assert not target.exists()
    assert not (directory.path / "env.json").is_symlink()
    # A link where the temp file will go makes the write fail instead of following it.
    directory = prepare_directory(shm, "exec-t")
    os.symlink(target, directory.path / f".env.json.{os.getpid()}.tmp")
    with pytest.raises(RenderError):
        write(directory, variables, [])
    assert not target.exists()


def test_out_dir_symlink_refused(shm: Path, tmp_path: Path) -> None:
    os.symlink(tmp_path, shm / "link")
    with pytest.raises(RenderError):
        prepare_directory(shm / "link", "exec-l", allow_disk=True)


def test_wipe_removes_everything(shm: Path) -> None:
    directory = prepare_directory(shm, "exec-w")
    write(directory, {"A": Variable("v", True, False, "x")}, [])
    report = wipe(directory)
    assert sorted(report.removed) == ["env", "env.json", "manifest.json", "mcp.json"]
    assert report.failed == []
    assert not directory.path.exists()
    assert wipe(directory).removed == []


def test_wipe_reports_what_it_could_not_remove(shm: Path, tmp_path: Path) -> None:
    """A non-root broker cannot remove a root-owned file in a root-owned sub-directory."""
    broker_uid = 10002
    directory = prepare_directory(shm, "exec-r")
    os.chown(shm, broker_uid, -1)
    os.chown(directory.path, broker_uid, -1)
    stuck = directory.path / "root-dir"
    stuck.mkdir(mode=0o755)
    (stuck / "f").write_text("x")
    (directory.path / "mine").write_text("x")
    os.chown(directory.path / "mine", broker_uid, -1)
    pid = os.fork()
    if pid == 0:  # the child becomes the broker's uid and wipes
        try:
            os.setgroups([])
            os.setgid(10000)
            os.setuid(broker_uid)
            report = wipe(directory)
            ok = "mine" in report.removed and any(
                f.startswith("root-dir/f:") for f in report.failed
            )
            os._exit(0 if ok and directory.path.exists() else 3)
        except BaseException:
            os._exit(4)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert not (directory.path / "mine").exists() and (stuck / "f").exists()
