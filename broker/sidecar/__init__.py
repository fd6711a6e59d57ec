"""The runner-side sidecar: a long-lived front end over the execution core.

``app`` wires startup, serving and shutdown; ``registry`` keeps one record per execution
(states, TTL timers, lease watch, bounded summaries); ``api`` is the Unix-socket HTTP API;
``peers`` identifies callers; ``metrics`` counts steps and outcomes.
"""
