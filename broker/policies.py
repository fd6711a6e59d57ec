"""The HCL policies in ``policies/``, rendered for a given Vault layout."""

from __future__ import annotations

from string import Template

from broker.config import Layout
from broker.datafiles import data_dir
from broker.errors import ConfigError

POLICY_NAMES = ("stigmer-control-plane", "stigmer-runner", "stigmer-admin")


def render(layout: Layout, jwt_accessor: str) -> dict[str, str]:
    """Every policy's HCL with mounts and the JWT mount accessor filled in."""
    values = {
        "kv_mount": layout.kv_mount,
        "transit_mount": layout.transit_mount,
        "jwt_mount": layout.jwt_mount,
        "jwt_accessor": jwt_accessor,
    }
    directory = data_dir("policies", "stigmer-runner.hcl")
    rendered = {}
    for name in POLICY_NAMES:
        text = (directory / f"{name}.hcl").read_text(encoding="utf-8")
        try:
            rendered[name] = Template(text).substitute(values)
        except (KeyError, ValueError) as exc:
            raise ConfigError(f"policy {name}: bad template ({exc})") from None
    return rendered
