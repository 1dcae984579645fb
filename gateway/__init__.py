"""patgate: a reverse-proxy authentication gateway for Personal Access Tokens."""

__version__ = "0.1.0"
