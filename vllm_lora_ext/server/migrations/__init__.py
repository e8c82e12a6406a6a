"""/v1/migrations: routes, migration jobs, forwarding of adapters not yet migrated."""
