"""End-to-end tests: packets through both NATs, in network namespaces (needs root)."""
