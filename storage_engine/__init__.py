"""RaftKV storage engine: client HTTP API, LevelDB-backed map, gRPC StateMachine."""
