"""Who may call and where the function may call out: auth and consumers' keys, the lifecycle key, and
the network guard for client-given URLs.
"""
