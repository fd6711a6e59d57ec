"""The HCL policies in ``policies/``, rendered for a Vault layout and its auth mounts.

The runner policy's tenant-scoped block is repeated once per enabled identity source, each
with that source's template for the tenant (see ``policies/stigmer-runner.hcl``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from string import Template

from broker.config import Layout
from broker.dev.datafiles import data_dir
from broker.errors import ConfigError
from broker.records import record

POLICY_NAMES = ("stigmer-control-plane", "stigmer-runner", "stigmer-reaper", "stigmer-admin")
_BLOCK = re.compile(
    r"^# BEGIN per-identity-source\n(?P<block>.*?)^# END per-identity-source\n",
    re.DOTALL | re.MULTILINE,
)


@record(frozen=True)
class IdentitySources:
    """Accessors of the enabled auth mounts a runner can log in through."""

    jwt: str = ""
    kubernetes: str = ""
    approle: str = ""

    def templates(self) -> dict[str, str]:
        """Auth method → the Vault template that yields the identity's tenant."""
        out = {}
        if self.jwt:
            out["jwt"] = f"{{{{identity.entity.aliases.{self.jwt}.metadata.tenant}}}}"
        if self.kubernetes:
            out["kubernetes"] = (
                f"{{{{identity.entity.aliases.{self.kubernetes}.metadata.service_account_namespace}}}}"
            )
        if self.approle:
            out["approle"] = "{{identity.entity.metadata.tenant}}"
        return out


def _substitute(name: str, text: str, values: Mapping[str, str]) -> str:
    try:
        return Template(text).substitute(values)
    except (KeyError, ValueError) as exc:
        raise ConfigError(f"policy {name}: bad template ({exc})") from None


def render(layout: Layout, sources: IdentitySources) -> dict[str, str]:
    """Every policy's HCL with mounts and identity templates filled in."""
    templates = sources.templates()
    if not templates:
        raise ConfigError("no runner auth method is enabled: run `stigmer-broker setup` first")
    values = {
        "kv_mount": layout.kv_mount,
        "transit_mount": layout.transit_mount,
        "jwt_mount": layout.jwt_mount,
        "kubernetes_mount": layout.kubernetes_mount,
        "approle_mount": layout.approle_mount,
    }
    directory = data_dir("policies", "stigmer-runner.hcl")
    rendered = {}
    for name in POLICY_NAMES:
        text = (directory / f"{name}.hcl").read_text(encoding="utf-8")
        match = _BLOCK.search(text)
        if match:
            blocks = "".join(
                f"# --- identities from auth/{method} ---\n"
                + _substitute(name, match.group("block"), {**values, "tenant": template})
                for method, template in templates.items()
            )
            text = text[: match.start()] + blocks + text[match.end() :]
        rendered[name] = _substitute(name, text, values)
    return rendered
