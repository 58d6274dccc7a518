#!/usr/bin/env bash
# Regenerates the gRPC stubs in raftkv/pb from proto/consensus.proto.
# The stubs are checked in so that `pip install` needs no build step;
# tests/unit/test_proto_stubs.py fails when they drift from the .proto.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-.}
python -m grpc_tools.protoc -Iraftkv/pb=proto --python_out="$out" --grpc_python_out="$out" raftkv/pb/consensus.proto
