"""Use cases that the CLI, the daemon and the API share, over the ports.

The composition root (`connector.app`) builds them; each takes only the ports
and settings it uses.
"""
