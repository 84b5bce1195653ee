"""gunicorn config for tests/test_metrics.py: hostsvc's metrics hooks, settings from env."""
import os

from hostsvc.metrics import gunicorn_hooks

bind = os.environ["TEST_BIND"]
workers = int(os.environ.get("TEST_WORKERS", "2"))
timeout = int(os.environ.get("TEST_TIMEOUT", "30"))
max_requests = int(os.environ.get("TEST_MAX_REQUESTS", "0"))
threads = int(os.environ.get("TEST_THREADS", "1"))
worker_class = "gthread" if threads > 1 else "sync"
graceful_timeout = 5
preload_app = True
control_socket_disable = True
loglevel = "warning"
globals().update(gunicorn_hooks(os.environ["TEST_APP_NAME"]))
