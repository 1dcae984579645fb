"""The management HTTP API, session JWTs and the web UI."""
