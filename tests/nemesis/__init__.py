"""Jepsen-style fault injection for RaftKV: network namespaces, a nemesis, a checked workload.

netns.py     namespaces + bridge + partitions, and RaftKV node processes (in namespaces or on 127.0.0.1)
workload.py  concurrent clients recording a History, the nemesis schedule, convergence and the report
"""
