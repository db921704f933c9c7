"""The operator's side: metrics, the status page, health and readiness, client configuration
snippets, and the users file."""
