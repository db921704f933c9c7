"""hubproxy: a small, fast, TLS-terminating Docker Hub registry mirror built on trio and h11."""

__version__ = "0.1.0"
