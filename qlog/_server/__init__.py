"""qlog serve: the HTTP API, the dashboard and /metrics (needs qlog[server])."""
