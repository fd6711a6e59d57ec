"""``python -m broker.cli``."""

from broker.cli import entry

entry()
