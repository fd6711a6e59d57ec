"""The sidecar's Prometheus metrics. Labels are steps and outcomes, never ids or values."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from broker.vault.client import observe_requests


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.active = Gauge(
            "stigmer_broker_executions_active", "Executions prepared and not ended", registry=r
        )
        self.started = Counter(
            "stigmer_broker_executions_started", "Executions prepared", registry=r
        )
        self.ended = Counter(
            "stigmer_broker_executions_ended",
            "Executions ended, by outcome",
            ["outcome"],
            registry=r,
        )
        self.prepare_seconds = Histogram(
            "stigmer_broker_prepare_seconds",
            "Time to claim, lease, decrypt and render one execution",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=r,
        )
        self.vault_requests = Counter(
            "stigmer_broker_vault_requests",
            "Vault requests by operation and outcome (ok or the fault's kind)",
            ["operation", "outcome"],
            registry=r,
        )
        self.renewals = Counter(
            "stigmer_broker_token_renewals",
            "Login token renewals, by result",
            ["result"],
            registry=r,
        )
        self.logins = Counter("stigmer_broker_logins", "Logins, by result", ["result"], registry=r)
        self.revocations = Counter(
            "stigmer_broker_revocations",
            "Lease and login revocations, by result",
            ["result"],
            registry=r,
        )
        self.errors = Counter("stigmer_broker_errors", "Errors, by class", ["error"], registry=r)
        self.denied_peers = Counter(
            "stigmer_broker_denied_peers", "Socket connections refused by peer uid", registry=r
        )
        self.vault_ready = Gauge(
            "stigmer_broker_vault_ready",
            "1 if the last check found Vault usable with the sidecar's login (see /readyz)",
            registry=r,
        )
        self.vault_ready.set(1)
        self.claim_conflicts = Counter(
            "stigmer_broker_claim_conflicts",
            "Claims refused because another holds them",
            registry=r,
        )
        self._request_counts: dict[tuple[str, str], Any] = {}  # labels() takes a lock each time
        observe_requests(self._vault_request)

    def _vault_request(self, operation: str, outcome: str) -> None:
        child = self._request_counts.get((operation, outcome))
        if child is None:
            child = self._request_counts[operation, outcome] = self.vault_requests.labels(
                operation, outcome
            )
        child.inc()

    def keeper_event(self, what: str, result: str) -> None:
        """The token keeper's logins, renewals and revocations."""
        counter = {"login": self.logins, "renewal": self.renewals}.get(what, self.revocations)
        counter.labels(result).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
