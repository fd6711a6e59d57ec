"""The runner-side sidecar: identity → claim → lease → decrypt → render → serve → revoke.

``app`` wires the parts; each other module does one step.
"""
