"""Warm start: what the FC initializer and the worker's start-up do before the first request."""
