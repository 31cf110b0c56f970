"""The E2B-compatible API: the unmodified `e2b` SDK works against `arcbox-vm serve`.

Two HTTP servers over the daemon's one `SandboxManager` (see docs/ARCHITECTURE.md,
"The E2B-compatible API"):

- the control plane (`control.py`, E2B_API_URL): REST + JSON, `X-API-KEY`;
- the in-sandbox API, "envd" (`envd/`, E2B_SANDBOX_URL): Connect-RPC (JSON codec) for
  processes and the filesystem, plain HTTP for file transfers. One address serves every
  sandbox, routed on the SDK's `E2b-Sandbox-Id` / `E2b-Sandbox-Port` headers, and speaks
  our own agent protocol to the guest through the manager — no second agent in the guest.

`server.py` runs both (the daemon only calls `start_e2b`).
"""
