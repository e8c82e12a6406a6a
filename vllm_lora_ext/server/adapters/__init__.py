"""/v1/adapters: its routes and the service that registers, serves and removes adapters."""
