"""The control-plane side: store Environments, issue ExecutionContexts, bootstrap Vault.

Nothing here ever calls Transit decrypt; the control-plane policy does not allow it.
"""
