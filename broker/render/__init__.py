"""Writing an execution's files to a memory-backed directory, safely, and wiping them afterwards.

``formats`` turns variables and resolved MCP servers into file contents; ``outdir`` owns the
output root and execution directories (tmpfs check, modes, atomic writes, wipe); ``files``
writes one execution's four files.
"""
