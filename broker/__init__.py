"""stigmer-broker: a Vault/OpenBao-backed secrets broker for Stigmer agent and workflow runners.

The control plane for Python backends, the same code the CLI and ``control serve`` run::

    from broker import EnvironmentStore, ExecutionIssuer, Layout, VaultClient, VaultSettings

Imported on first use, so ``stigmer-broker --help`` stays fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"

_PUBLIC = {
    "EnvironmentStore": "broker.control.environments",
    "ExecutionIssuer": "broker.control.executions",
    "IssuedContext": "broker.control.executions",
    "RuntimeValue": "broker.control.executions",
    "Layout": "broker.config",
    "VaultSettings": "broker.config",
    "VaultClient": "broker.vault",
    "BrokerError": "broker.errors",
}
__all__ = [
    "BrokerError",
    "EnvironmentStore",
    "ExecutionIssuer",
    "IssuedContext",
    "Layout",
    "RuntimeValue",
    "VaultClient",
    "VaultSettings",
    "__version__",
]

if TYPE_CHECKING:
    from broker.config import Layout, VaultSettings
    from broker.control.environments import EnvironmentStore
    from broker.control.executions import ExecutionIssuer, IssuedContext, RuntimeValue
    from broker.errors import BrokerError
    from broker.vault import VaultClient


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'broker' has no attribute {name!r}")
