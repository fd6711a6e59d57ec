"""What the sidecar's socket API says, defined once for the server and for ``broker.client``.

Answers carry paths, names, secret flags, states and expiry; never a value. The runner's
``STIGMER_*`` variables are defined here too, so ``run`` and a runner using the client get the
same ones. Standard library only: runners import this.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from broker.records import field, record


@record(frozen=True)
class FilePaths:
    directory: str
    env: str
    env_json: str
    mcp_json: str
    manifest: str

    @classmethod
    def of(cls, directory: Path) -> FilePaths:
        base = str(directory)  # joined as strings: pathlib's joins were most of an answer's cost
        return cls(base, f"{base}/env", f"{base}/env.json", f"{base}/mcp.json",
                   f"{base}/manifest.json")  # fmt: skip


def runner_variables(execution_id: str, files: FilePaths) -> dict[str, str]:
    """The ``STIGMER_*`` variables a runner gets beside the execution's own variables."""
    return {
        "STIGMER_EXECUTION_ID": execution_id,
        "STIGMER_MCP_CONFIG": files.mcp_json,
        "STIGMER_ENV_FILE": files.env,
        "STIGMER_ENV_JSON": files.env_json,
        "STIGMER_MANIFEST": files.manifest,
    }


@record(frozen=True)
class Ended:
    """How an execution ended and what its cleanup did (``pending``: still being retried)."""

    reason: str
    files_removed: list[str] = field(default_factory=list)
    context: str = "kept"
    lease: str = "kept"
    claim: str = "none"
    errors: list[str] = field(default_factory=list)
    pending: list[str] = field(default_factory=list)  # Vault steps still being retried


@record(frozen=True)
class ExecutionAnswer:
    id: str
    state: str
    tenant: str
    expires_at: str | None
    files: FilePaths | None = None
    variables: dict[str, dict[str, bool]] | None = None
    ended: Ended | None = None

    def to_json(self) -> dict[str, Any]:
        # Field by field: ``asdict`` deep-copies every variable's flags (milliseconds at N=1000).
        answer: dict[str, Any] = {"id": self.id, "state": self.state, "tenant": self.tenant,
                                  "expires_at": self.expires_at}  # fmt: skip
        if self.files is not None:
            answer["files"] = dict(vars(self.files))  # flat records of strings and lists
        if self.variables is not None:
            answer["variables"] = self.variables
        if self.ended is not None:
            answer["ended"] = dict(vars(self.ended))
        return {key: value for key, value in answer.items() if value is not None}

    @classmethod
    def from_json(cls, answer: dict[str, Any]) -> ExecutionAnswer:
        files, ended = answer.get("files"), answer.get("ended")
        return cls(
            id=str(answer["id"]),
            state=str(answer["state"]),
            tenant=str(answer.get("tenant", "")),
            expires_at=answer.get("expires_at"),
            files=FilePaths(**files) if isinstance(files, dict) else None,
            variables=answer.get("variables"),
            ended=Ended(**ended) if isinstance(ended, dict) else None,
        )

    # --- for runners --------------------------------------------------------------------------

    def _files(self) -> FilePaths:
        if self.files is None:
            raise ValueError(f"execution {self.id} has no files (state {self.state})")
        return self.files

    @property
    def directory(self) -> Path:
        return Path(self._files().directory)

    @property
    def mcp_config(self) -> Path:
        return Path(self._files().mcp_json)

    @property
    def env_file(self) -> Path:
        return Path(self._files().env)

    @property
    def env_json(self) -> Path:
        return Path(self._files().env_json)

    def environ(self) -> dict[str, str]:
        """The variables as a child process environment, with the ``STIGMER_*`` ones."""
        values: dict[str, str] = json.loads(self.env_json.read_text(encoding="utf-8"))
        return {**values, **runner_variables(self.id, self._files())}


@record(frozen=True)
class Problem:
    """An error answer, in the shape of RFC 9457 problem details (never a value)."""

    status: int
    title: str
    detail: str
    type: str = "about:blank"
    problems: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)
