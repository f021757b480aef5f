"""Throughput, latency and cost benchmarks of the sink worker against ceilings and peers.

Entry point: `python -m benchmarks.run` (see `benchmarks/README.md`).
"""
