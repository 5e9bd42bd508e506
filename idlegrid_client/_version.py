"""The client's version (the User-Agent it sends)."""

__version__ = "0.1.0"
