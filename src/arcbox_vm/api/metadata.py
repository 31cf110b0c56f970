"""gRPC metadata keys of sandbox.v1, shared by the daemon and the client (no imports)."""

EXEC_ID = "arcbox-exec-id"
"""Initial metadata of Run / Exec / Attach: the command's exec id in its sandbox."""

EVENTS_SUBSCRIBED = "arcbox-events-subscribed"
"""Initial metadata of Events, sent once the subscription is live ("1"): a client that waits
for it before acting sees every event its actions cause."""
