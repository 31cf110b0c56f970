"""gRPC metadata keys of sandbox.v1, shared by the daemon and the client (no imports)."""

EXEC_ID = "arcbox-exec-id"
"""Initial metadata of Run / Exec / Attach: the command's exec id in its sandbox."""
