"""Response caching: exact (any Redis, or in process) and semantic (Redis Query Engine)."""
