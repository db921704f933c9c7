"""The connections: our TLS stream, connecting upstream, one h11 exchange with an upstream, the
per-origin keep-alive pool, and the listener with one h11 server loop per client. They carry
bytes and time out; they decide nothing about registries."""
