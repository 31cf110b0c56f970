"""Templates: sandbox images built from a Dockerfile subset, booted from a checkpoint.

This package holds what both sides need and nothing that runs a VM: the Dockerfile
parser (`dockerfile.py`), the build context (packing with .dockerignore on the client,
safe unpacking and content hashes in the daemon: `buildctx.py`), names and the public
data types (`models.py`). The build itself is a manager use case
(`arcbox_vm.manager.templates`); the client imports this package, never that one.
"""
