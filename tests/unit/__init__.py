"""Unit tier: one module at a time (pipelines, contract, settings, guards, deploy files), no app over HTTP."""
