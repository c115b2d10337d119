"""Tenants and what they are owed: the SQLite store, its migrations, the usage ledger."""
