"""One execution core for both front ends (``run`` and the sidecar).

login (``credentials``) → keep it alive (``keeper``) → lease → claim (``claims``) → read the
context (``context``) → decrypt → resolve → render → … → end: wipe, destroy, release, revoke
(``core``). The core does not know which front end called it: ``run`` uses the login token as
the execution's lease, the sidecar a child token per execution (``LeaseMode``).
"""
