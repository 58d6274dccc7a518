"""RaftKV Raft sidecar: a PySyncObj node, the RaftNode gRPC service and the management API."""
