"""hostsvc: host many Python web apps behind one nginx, each in its own gunicorn pool."""

__version__ = "0.1.0"
