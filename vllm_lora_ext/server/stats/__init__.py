"""/v1/stats: its routes and the service that captures layer-input statistics from traffic."""
