"""The TLS context for Vault, built from the same settings the Vault CLI reads.

``VAULT_CACERT`` (a PEM bundle) and ``VAULT_CAPATH`` (a directory of PEM files, every one loaded,
as the Vault CLI does) replace the system trust store; ``VAULT_CLIENT_CERT``/``VAULT_CLIENT_KEY``
present a client certificate; ``VAULT_SKIP_VERIFY`` turns verification off (never in
production). ``VAULT_TLS_SERVER_NAME`` is applied by the transport (SNI and hostname check).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from broker.config import VaultSettings, uses_tls
from broker.errors import ConfigError

if TYPE_CHECKING:
    import ssl


def ssl_context(settings: VaultSettings) -> ssl.SSLContext | None:
    """The context for https addresses; None when no address uses https."""
    if not uses_tls(settings.addresses):
        return None
    # Here: a `run` over plain http never loads ssl (broker.cli._without_ssl_over_plain_http).
    import ssl

    custom_ca = bool(settings.cacert or settings.capath)
    try:
        if custom_ca:
            context = ssl.create_default_context(cafile=settings.cacert or None)
            for certificate in _ca_files(settings.capath):
                try:
                    context.load_verify_locations(cafile=certificate)
                except ssl.SSLError:
                    raise ConfigError(
                        f"VAULT_CAPATH: {certificate} is not a PEM certificate",
                        hint="VAULT_CAPATH must hold CA certificates only",
                    ) from None
        else:
            context = ssl.create_default_context()
        if settings.client_cert:
            context.load_cert_chain(settings.client_cert, settings.client_key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"TLS settings: cannot load the CA or client certificate ({_why(exc)})",
            hint="check VAULT_CACERT, VAULT_CAPATH, VAULT_CLIENT_CERT and VAULT_CLIENT_KEY",
        ) from None
    if settings.skip_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def _ca_files(capath: str) -> list[str]:
    """Every file in ``VAULT_CAPATH``, as the Vault CLI loads it (no ``c_rehash`` names needed)."""
    if not capath:
        return []
    directory = Path(capath)
    if not directory.is_dir():
        raise ConfigError(f"VAULT_CAPATH {capath}: not a directory")
    files = sorted(str(p) for p in directory.iterdir() if p.is_file())
    if not files:
        raise ConfigError(f"VAULT_CAPATH {capath}: holds no certificate files")
    return files


def _why(error: Exception) -> str:
    if isinstance(error, OSError) and error.strerror:
        return f"{error.strerror}: {error.filename}" if error.filename else error.strerror
    return type(error).__name__
