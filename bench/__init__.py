"""Benchmarks of RaftKV against etcd and against raw ceilings, all in one run (see bench/README.md)."""
