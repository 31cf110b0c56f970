"""`arcbox-vm serve`: the long-running daemon serving sandbox.v1 over gRPC."""
