"""What is kept: the records database and its migrations, the ledger, billing and metering.
"""
