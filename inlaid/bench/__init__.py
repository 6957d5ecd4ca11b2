"""Benchmarks: workloads, load generation, metrics and reports."""
