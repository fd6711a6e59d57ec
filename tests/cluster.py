"""A real OpenBao Raft cluster on loopback for the HA tests: N `bao server` processes with
integrated storage, initialised and unsealed over the HTTP API (one key share), the followers
joined and promoted to voters. Nodes can be killed and restarted (and are unsealed again)."""

from __future__ import annotations

import json
import signal
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from string import Template
from typing import Any

from broker.dev import server

CONFIG = Path(__file__).parent.parent / "deploy" / "openbao" / "raft-node.hcl"


def call(
    addr: str, method: str, path: str, body: Any = None, token: str = "", timeout: float = 5
) -> tuple[int, dict[str, Any]]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(f"{addr}/v1/{path}", data=data, method=method)  # noqa: S310
    if token:
        request.add_header("X-Vault-Token", token)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:  # noqa: S310
            text = answer.read()
            return answer.status, json.loads(text) if text else {}
    except urllib.error.HTTPError as refused:
        text = refused.read()
        try:
            return refused.code, json.loads(text) if text else {}
        except ValueError:
            return refused.code, {}
    except OSError:
        return 0, {}


@dataclass
class Node:
    index: int
    directory: Path
    api_port: int = field(default_factory=server.free_port)
    cluster_port: int = field(default_factory=server.free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def addr(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def start(self) -> None:
        (self.directory / "data").mkdir(parents=True, exist_ok=True)
        config = self.directory / "server.hcl"
        config.write_text(Template(CONFIG.read_text()).substitute(
            data_dir=self.directory / "data", node_id=f"node{self.index}", retry_join="",
            listen_address=f"127.0.0.1:{self.api_port}", api_addr=self.addr,
            cluster_listen_address=f"127.0.0.1:{self.cluster_port}",
            cluster_addr=f"https://127.0.0.1:{self.cluster_port}", tls="  tls_disable = true",
        ))  # fmt: skip
        with (self.directory / "server.log").open("ab") as log:
            self.process = subprocess.Popen(
                [server.find_binary(), "server", f"-config={config}"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,
            )  # fmt: skip
        self._wait(lambda: call(self.addr, "GET", "sys/seal-status")[0] == 200, "to listen")

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)
        self.process = None

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
        self.process = None

    def _wait(self, condition: Any, what: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if self.process is not None and self.process.poll() is not None:
                log = (self.directory / "server.log").read_text()[-2000:]
                raise AssertionError(f"node{self.index} exited: {log}")
            if time.monotonic() > deadline:
                raise AssertionError(f"node{self.index} did not come {what}")
            time.sleep(0.1)


@dataclass
class Cluster:
    root: Path
    size: int = 3
    nodes: list[Node] = field(default_factory=list)
    token: str = field(default="", repr=False)
    unseal_key: str = field(default="", repr=False)

    @property
    def addresses(self) -> str:
        """VAULT_ADDR for the broker: every node, comma-separated."""
        return ",".join(node.addr for node in self.nodes)

    def start(self) -> Cluster:
        self.nodes = [Node(i, self.root / f"node{i}") for i in range(self.size)]
        first = self.nodes[0]
        first.start()
        status, answer = call(first.addr, "PUT", "sys/init",
                              {"secret_shares": 1, "secret_threshold": 1}, timeout=60)  # fmt: skip
        assert status == 200, answer
        self.token, self.unseal_key = answer["root_token"], answer["keys_base64"][0]
        self.unseal(first)
        self._wait_active(first)
        # Followers become voters after the stabilisation time: shorten it from 10 s.
        status, answer = call(first.addr, "POST", "sys/storage/raft/autopilot/configuration",
                              {"server_stabilization_time": "2s",
                               "cleanup_dead_servers": False}, self.token)  # fmt: skip
        assert status in (200, 204), answer
        for node in self.nodes[1:]:
            node.start()
            status, answer = call(node.addr, "POST", "sys/storage/raft/join",
                                  {"leader_api_addr": first.addr}, timeout=60)  # fmt: skip
            assert status == 200 and answer.get("data", answer).get("joined", True), answer
            self.unseal(node)
        self.wait_voters(self.size)
        return self

    def unseal(self, node: Node) -> None:
        def unsealed() -> bool:
            status, answer = call(node.addr, "PUT", "sys/unseal", {"key": self.unseal_key})
            return status == 200 and answer.get("sealed") is False

        node._wait(unsealed, "unsealed")

    def _wait_active(self, node: Node) -> None:
        node._wait(lambda: call(node.addr, "GET", "sys/health")[0] == 200, "active")

    def voters(self) -> int:
        for node in self.alive():
            status, answer = call(node.addr, "GET", "sys/storage/raft/autopilot/state",
                                  token=self.token)  # fmt: skip
            if status == 200:
                data = answer.get("data") or {}
                servers = data.get("servers") or {}
                healthy = {name for name, s in servers.items() if s.get("healthy")}
                return len(set(data.get("voters") or []) & healthy)
        return 0

    def wait_voters(self, count: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while self.voters() < count:
            assert time.monotonic() < deadline, f"fewer than {count} healthy voters"
            time.sleep(0.5)

    def alive(self) -> list[Node]:
        return [n for n in self.nodes if n.process is not None and n.process.poll() is None]

    def leader(self) -> Node:
        """The active node (it answers sys/health with 200)."""
        for node in self.alive():
            if call(node.addr, "GET", "sys/health")[0] == 200:
                return node
        raise AssertionError("no active node")

    def wait_leader(self, timeout: float = 30) -> Node:
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self.leader()
            except AssertionError:
                assert time.monotonic() < deadline, "no new leader"
                time.sleep(0.2)

    def restart(self, node: Node) -> None:
        node.start()
        self.unseal(node)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
