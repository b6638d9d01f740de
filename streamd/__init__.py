"""streamd: open-set speaker and spoken-digit recognition daemon."""

__version__ = "0.1.0"
