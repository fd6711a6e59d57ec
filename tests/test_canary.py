"""Canary sweep: secret values must not reach logs, output, errors, argv, environ or disk."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import time
from pathlib import Path
from urllib.parse import quote

import pytest
import yaml

from broker.errors import BrokerError
from broker.logs import JsonFormatter, Redactor
from broker.vault import VaultClient
from tests.conftest import Vault, cli, start_run, wait_until

CANARIES = {
    "ENV_SECRET": "cnry-env-7f3a9c1e-do-not-leak",
    "RUNTIME_SECRET": "cnry-rt-52be80d4-do-not-leak",
}


def forms(value: str) -> list[str]:
    raw = value.encode()
    return [value, base64.b64encode(raw).decode(), quote(value, safe=""), json.dumps(value)[1:-1]]


def hits(text: str) -> list[str]:
    return [f for value in CANARIES.values() for f in forms(value) if f in text]


def scan_tree(root: Path, since: float, skip: Path | None = None) -> list[str]:
    found = []
    for path in root.rglob("*"):
        try:
            if (
                (skip and path.resolve().is_relative_to(skip))
                or not path.is_file()
                or path.is_symlink()
            ):
                continue
            if path.stat().st_mtime < since or path.stat().st_size > 50_000_000:
                continue
            data = path.read_bytes().decode("utf-8", errors="replace")
        except OSError:
            continue
        if hits(data):
            found.append(str(path))
    return found


@pytest.fixture
def agent_file(tmp_path: Path) -> Path:
    path = tmp_path / "agent.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "api_version": "agentic.stigmer.ai/v1",
                "kind": "Agent",
                "metadata": {"name": "canary-agent"},
                "spec": {
                    "instructions": "Use the canary tools.",
                    "env_spec": {"data": {"ENV_SECRET": {"is_secret": True}}},
                    "mcp_servers": [
                        {
                            "name": "s",
                            "stdio": {"command": "x", "env_placeholders": {"T": "${ENV_SECRET}"}},
                        },
                        {
                            "name": "h",
                            "http": {
                                "url": "https://h.example",
                                "headers": {"A": "Bearer ${RUNTIME_SECRET}"},
                            },
                        },
                    ],
                },
            }
        )
    )
    return path


async def test_canaries_never_leak(
    vault: Vault, tenant: str, shm: Path, tmp_path: Path, agent_file: Path
) -> None:
    started = time.time() - 1
    outputs: list[str] = []

    def run_cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        result = cli(vault, *args, input=stdin)
        outputs.extend([result.stdout, result.stderr])
        return result

    # Secrets arrive on stdin only: never in argv, never in a file the test wrote.
    created = run_cli("env", "create", "canary-env", "--tenant", tenant, "--secret", "ENV_SECRET",
                      stdin=CANARIES["ENV_SECRET"] + "\n")  # fmt: skip
    assert created.returncode == 0, created.stderr
    assert run_cli("env", "get", "canary-env", "--tenant", tenant, "-o", "json").returncode == 0
    issued = run_cli(
        "execution", "create", "--tenant", tenant, "--agent", str(agent_file),
        "--environment", "canary-env", "--secret", "RUNTIME_SECRET", "--id", "canary-1", "-o", "json",
        stdin=CANARIES["RUNTIME_SECRET"] + "\n",
    )  # fmt: skip
    assert issued.returncode == 0, issued.stderr
    assert (
        run_cli("execution", "show", "canary-1", "--tenant", tenant, "-o", "json").returncode == 0
    )

    # A failing create whose input holds a canary: the error must not quote it.
    refused = run_cli(
        "execution", "create", "--tenant", tenant, "--agent", str(agent_file), "--environment", "canary-env",
        "--secret", "RUNTIME_SECRET", "--secret", "1BAD", "--id", "canary-2",
        stdin=CANARIES["RUNTIME_SECRET"] + "\n" + CANARIES["ENV_SECRET"] + "\n",
    )  # fmt: skip
    assert refused.returncode != 0 and "1BAD" in refused.stderr

    # The runner: watch the broker's own /proc while the command runs.
    marker = shm / "ready"
    child = (
        "import os, pathlib, time\n"
        f"pathlib.Path({str(marker)!r}).write_text(str(os.getppid()))\n"
        "time.sleep(1.5)\n"
    )
    out = shm / "out"
    process = start_run(vault, tenant, "canary-1", out, vault.jwt_for(tenant, tmp_path), child)
    await wait_until(marker.exists, 20)
    broker_pid = int(marker.read_text())
    assert broker_pid == process.pid
    proc = Path(f"/proc/{broker_pid}")
    broker_environ = (proc / "environ").read_bytes().decode(errors="replace")  # as root
    broker_cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
    rendered = (out / "canary-1" / "env.json").read_text()
    stdout, stderr = process.communicate(timeout=30)
    assert process.returncode == 0, stderr
    outputs.extend([stdout, stderr])

    assert json.loads(rendered)["ENV_SECRET"] == CANARIES["ENV_SECRET"]  # the canaries were live
    assert hits(broker_environ) == [] and hits(broker_cmdline) == []
    for text in outputs:
        assert hits(text) == [], text
    for line in stderr.splitlines():
        json.loads(line)  # every log line is structured
    state = vault.server.state_dir
    assert hits((state / "server.log").read_text(errors="replace")) == []
    assert hits((state / "audit.log").read_text(errors="replace")) == []
    assert (state / "audit.log").stat().st_size > 0  # the audit device is recording
    leaked = []
    for root in (tmp_path, state, Path("/tmp"), Path("/dev/shm"), Path.cwd()):
        leaked += scan_tree(root, started, skip=out.resolve())
    assert leaked == []


@pytest.mark.unit
def test_log_formatter_redacts_decrypted_values_in_every_form(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import logging

    from broker import logs

    redactor = Redactor()  # this test's own: the process-wide one is left alone
    monkeypatch.setattr(logs, "REDACTOR", redactor)
    value = "cnry-log-1f2e3d4c-do-not-leak"
    registration = redactor.register([value])
    url_safe = base64.urlsafe_b64encode(value.encode()).decode()
    message = " ".join([*forms(value), url_safe, url_safe.rstrip("=") + "."])  # padded, or not
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "value %s", (message,), None)
    record.fields = {"detail": value}  # type: ignore[attr-defined]
    line = JsonFormatter().format(record)
    assert value not in line and base64.b64encode(value.encode()).decode() not in line
    assert quote(value, safe="") not in line
    assert url_safe.rstrip("=") not in line
    assert line.count("<redacted>") >= 6
    registration.release()  # the execution ended: the value leaves the redactor
    assert len(redactor) == 0
    assert value in JsonFormatter().format(record)


@pytest.mark.unit
def test_every_base64_spelling_of_a_value_is_redacted() -> None:
    redactor = Redactor()
    value = "pass>?>word"  # its base64 has "/" (URL-safe: "_") and padding
    redactor.register([value])
    standard = base64.b64encode(value.encode()).decode()
    url_safe = base64.urlsafe_b64encode(value.encode()).decode()
    assert "/" in standard and "_" in url_safe and standard.endswith("=")
    for spelling in (standard, standard.rstrip("="), url_safe, url_safe.rstrip("=")):
        scrubbed = redactor.scrub(f"token={spelling};")
        assert scrubbed.startswith("token=<redacted>") and spelling.rstrip("=") not in scrubbed


@pytest.mark.unit
def test_values_are_indexed_when_a_line_needs_them_and_forgotten_either_way() -> None:
    redactor = Redactor()
    unlogged = redactor.register(["ended-before-any-line"])
    unlogged.release()  # no line was scrubbed in between: never indexed, nothing left
    assert not redactor._pending and not redactor._by_prefix and len(redactor) == 0
    first = redactor.register(["first-value-1"])
    assert redactor.scrub("x first-value-1") == "x <redacted>"  # indexed on demand
    second = redactor.register(["second-value-2"])  # pending while the first is indexed
    first.release()
    assert redactor.scrub("first-value-1 second-value-2") == "first-value-1 <redacted>"
    second.release()
    assert len(redactor) == 0 and not redactor._by_prefix and not redactor._pending


@pytest.mark.unit
def test_redaction_stays_exact_while_other_executions_end() -> None:
    redactor = Redactor()
    first = redactor.register(["shared-value-1", "only-first-1"])
    second = redactor.register(["shared-value-1", "only-second-2"])
    first.release()
    text = "shared-value-1 only-first-1 only-second-2"
    assert redactor.scrub(text) == "<redacted> only-first-1 <redacted>"
    second.release()
    assert redactor.scrub(text) == text
    assert len(redactor) == 0 and not redactor._by_prefix  # nothing left behind to grow


async def test_broker_errors_carry_no_response_body(vault: Vault, admin: VaultClient) -> None:
    """A Vault failure names the operation and path only."""
    from broker.vault import KV

    with pytest.raises(BrokerError) as caught:
        await KV(admin, "no-such-mount").write("x", {"v": CANARIES["ENV_SECRET"]})
    assert hits(str(caught.value)) == []
    assert "no-such-mount/data/x" in str(caught.value)


@pytest.mark.unit
def test_environment_of_this_test_process_is_clean() -> None:
    assert hits("\0".join(f"{k}={v}" for k, v in os.environ.items())) == []
