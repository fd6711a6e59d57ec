"""Find the project's data folders (``policies/``, ``vault-dev/``) in a checkout or an install."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from broker.errors import ConfigError


def data_dir(name: str, marker: str) -> Path:
    """``$STIGMER_<NAME>_DIR``, the source checkout, or ``<prefix>/share/stigmer-broker``."""
    variable = f"STIGMER_{name.upper().replace('-', '_')}_DIR"
    candidates = [
        Path(os.environ[variable]) if variable in os.environ else None,
        Path(__file__).resolve().parents[2] / name,
        Path(sys.prefix) / "share" / "stigmer-broker" / name,
    ]
    for candidate in candidates:
        if candidate is not None and (candidate / marker).is_file():
            return candidate
    raise ConfigError(f"{name}/ not found (looked for {marker}); set {variable}")
