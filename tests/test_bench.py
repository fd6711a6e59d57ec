"""`make bench` must not rot: its smoke run (N = 10, one repetition) against its own dev server,
with `bao agent` and the raw-HTTP floor. No timing is asserted — only that every row was
measured and that an execution costs the Vault requests the README promises, none per secret."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
ROWS = ("run_cold", "agent", "sidecar_put_delete", "sidecar_put", "floor")


def smoke_run(tmp_path: Path, tls: bool) -> dict[str, Any]:
    """``bench.compare --smoke``'s results (``BENCH_TLS`` set as ``tls`` says), after checking
    that it says which it ran and measured every row."""
    out = tmp_path / "bench.json"
    environ = {k: v for k, v in os.environ.items() if k != "BENCH_TLS"}
    result = subprocess.run(
        [sys.executable, "-m", "bench.compare", "--smoke", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**environ, "BENCH_TLS": "1"} if tls else environ,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    results: dict[str, Any] = json.loads(out.read_text())
    assert results["tls"] is tls
    for row in ROWS:
        assert results["latency_ms"][row]["10"]["median"] > 0, row
    return results


def test_the_bench_smoke_run_measures_every_row(tmp_path: Path) -> None:
    results = smoke_run(tmp_path, tls=False)
    assert set(results["startup_ms"]) == {"--help", "--version"}
    assert results["throughput"]["cycles_per_second"] > 0
    assert results["memory"]["idle_rss_kib"] > 0
    assert "| 10 |" in results["table"]
    # An execution of 10 secrets: one decrypt, nothing per secret, nothing left out.
    run = results["requests_per_execution"]["run_n10"]
    assert run == {
        "total": 8,
        "update auth/jwt/login": 1,
        "read stigmer/data/execution-contexts": 1,
        "create stigmer/data/execution-claims": 1,
        "update stigmer/metadata/execution-claims": 1,
        "update stigmer-transit/decrypt": 1,
        "delete stigmer/metadata/execution-contexts": 1,
        "delete stigmer/metadata/execution-claims": 1,
        "update auth/token/revoke-self": 1,
    }, run
    sidecar = results["requests_per_execution"]["sidecar_n10"]
    assert sidecar["total"] == 8 and sidecar["update auth/token/create"] == 1, sidecar
    assert "update auth/jwt/login" not in sidecar  # warm: the sidecar's login is reused


def test_the_bench_smoke_run_works_over_tls(tmp_path: Path) -> None:
    """`BENCH_TLS=1`: every row against an HTTPS dev server, each client trusting its CA."""
    results = smoke_run(tmp_path, tls=True)
    assert results["requests_per_execution"]["sidecar_n10"]["total"] == 8
