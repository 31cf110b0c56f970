#!/usr/bin/env bash
# Regenerate the Python stubs of sandbox.v1 (committed, so installs need no protoc).
# Needs grpcio-tools (pip install -e '.[dev]').
set -euo pipefail
cd "$(dirname "$0")/../src"
PY=${PYTHON:-../.venv/bin/python}
"$PY" -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. arcbox_vm/api/sandbox/v1/sandbox.proto
echo "generated: $(ls arcbox_vm/api/sandbox/v1/*_pb2*.py* | tr '\n' ' ')"
