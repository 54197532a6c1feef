"""Security: TLS on both ports (tls.py), access groups and keys (groups.py, access.py), and the
one object a server process builds from its settings (setup.py)."""
