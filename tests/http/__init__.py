"""HTTP tier: the app built by the factory and called through Flask's test client, in this process."""
