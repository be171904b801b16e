"""Helpers shared by the tiers: the served process, loopback servers, waiting on a condition."""
