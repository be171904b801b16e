"""Tests of bench/: the benchmarks run at a tiny scale; those that start servers are marked `e2e`."""
