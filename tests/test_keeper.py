"""The token keeper against a real server behind the fault proxy: renewals, re-logins, and no
busy loop when Vault is gone (a leaked sidecar once burned a core retrying an expired token)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import pytest

from broker.config import VaultSettings
from broker.errors import PermissionDenied
from broker.execution.keeper import TokenKeeper
from broker.vault import Login, RetryPolicy, VaultClient, lookup_self
from broker.vault.auth import _login_from
from broker.vault.retry import Safety
from tests.conftest import Vault
from tests.faultproxy import FaultProxy, Rule

FAST = RetryPolicy(base_delay=0.05, max_delay=0.2, request_timeout=1.0, operation_deadline=1.0)


@pytest.fixture
async def through_proxy(vault: Vault, proxy: FaultProxy) -> AsyncIterator[VaultClient]:
    client = VaultClient(VaultSettings.local(proxy.url, vault.server.token), policy=FAST)
    yield client
    await client.aclose()


def login_with(client: VaultClient, ttl: str, max_ttl: str) -> tuple[list[Login], object]:
    """A login function that mints a renewable child of the root token (through ``client``)."""
    made: list[Login] = []

    async def login() -> Login:
        answer = await client.request(
            "POST",
            "auth/token/create",
            {"ttl": ttl, "explicit_max_ttl": max_ttl, "renewable": True, "policies": ["default"]},
            "login",
            Safety.MINTS_TOKEN,
        )
        made.append(_login_from(answer))
        return made[-1]

    return made, login


@contextlib.asynccontextmanager
async def running(keeper: TokenKeeper) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(keeper.run())
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_an_unreachable_vault_costs_no_cpu_and_the_keeper_recovers(
    through_proxy: VaultClient, proxy: FaultProxy, admin: VaultClient
) -> None:
    made, login = login_with(through_proxy, "2s", "1h")
    keeper = TokenKeeper(through_proxy, login, max_ttl=3600)  # type: ignore[arg-type]
    await keeper.start(5)
    first = keeper.current
    assert first is not None
    async with running(keeper):
        proxy.add(Rule("sealed"))  # every request: 503 sealed
        since = time.monotonic()
        cpu = time.process_time()
        await asyncio.sleep(5)  # the token (2 s) expires while Vault is away
        spent = time.process_time() - cpu
        attempts = len(proxy.requests(since=since))
        # Backoff: renewals at least 0.5 s apart, new logins at least 1 s apart, each with the
        # client's own short retries. A spinning loop makes thousands of attempts.
        assert attempts < 80, attempts
        assert spent < 1.5, spent
        assert first.expires <= time.monotonic(), "the token outlived its TTL in the keeper"
        proxy.clear()
        deadline = time.monotonic() + 10
        while keeper.current is first or keeper.current is None:
            assert time.monotonic() < deadline, "the keeper did not log in again"
            await asyncio.sleep(0.1)
    assert len(made) >= 2
    current = keeper.current
    assert current is not None
    assert await lookup_self(admin.with_token(current.login.token))
    await keeper.close()


async def test_a_revoked_login_is_replaced(through_proxy: VaultClient, admin: VaultClient) -> None:
    made, login = login_with(through_proxy, "3s", "1h")
    keeper = TokenKeeper(through_proxy, login, max_ttl=3600)  # type: ignore[arg-type]
    first = await keeper.start(5)
    async with running(keeper):
        await admin.with_token(first.login.token).request(
            "POST", "auth/token/revoke-self", None, "revoke"
        )
        deadline = time.monotonic() + 10
        while keeper.current is first:
            assert time.monotonic() < deadline, "the revoked login was kept"
            await asyncio.sleep(0.1)
    assert len(made) == 2
    await keeper.close()


async def test_renewals_keep_a_short_login_alive_and_close_revokes_it(
    through_proxy: VaultClient, admin: VaultClient, proxy: FaultProxy
) -> None:
    made, login = login_with(through_proxy, "2s", "1h")
    keeper = TokenKeeper(through_proxy, login, max_ttl=3600)  # type: ignore[arg-type]
    first = await keeper.start(5)
    async with running(keeper):
        await asyncio.sleep(4.5)  # twice its TTL: only renewals keep it alive
    assert keeper.current is first and len(made) == 1
    assert len(proxy.requests("renew-self")) >= 2
    assert await lookup_self(admin.with_token(first.login.token))
    await keeper.close()
    with pytest.raises(PermissionDenied):
        await lookup_self(admin.with_token(first.login.token))
