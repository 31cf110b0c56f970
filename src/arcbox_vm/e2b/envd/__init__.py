"""The in-sandbox API ("envd") served by the daemon on the host, for every sandbox.

`app.py` routes on the SDK's headers and checks access; `process_service.py` and
`fs_service.py` are the Connect services (connectrpc's ASGI server, envd's generated
classes); `files_http.py` the plain-HTTP file transfers; `processes.py` the commands
each sandbox runs; `watch.py` directory watching; `ports.py` the seam for other ports.
Everything reaches the guest through the `SandboxManager` and its agent channel.
"""
