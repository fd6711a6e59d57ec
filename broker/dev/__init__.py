"""Dev-only code: the throwaway dev server, the dev identity issuer, data-file lookup.

Nothing here runs in production paths except ``datafiles``, which finds the shipped
``policies/`` and ``vault-dev/`` folders in a checkout or an install.
"""

DEFAULT_STATE_DIR = ".vault-dev"
IDENTITY_KEY = "identity.pem"
DEFAULT_ISSUER = "https://kubernetes.default.svc.cluster.local"
DEFAULT_AUDIENCE = "vault"
SERVICE_ACCOUNT = "stigmer-runner"
