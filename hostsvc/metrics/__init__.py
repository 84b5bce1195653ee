"""Prometheus metrics for hostsvc: one package owns prometheus_client (issue #4).

Who calls what:
  supervisor, at start      prepare_multiproc_dir(path)      before any pool starts
  pool child (arbiter)      instrument(name, wsgi_app)       around the app it loads
  worker, as it exits       flush_requests()                 by itself (atexit/finalizer)
                            gunicorn_hooks(name)             into the arbiter's settings
                            worker_exited(name, pid, cause)  other engines, per worker exit
  supervisor                MetricsServer(state, listen, nginx_status_url).start()/stop()

Every metric is declared once in `spec.SPECS`; docs/metrics.md describes them.
"""
from __future__ import annotations

from .multiproc import (archive_dead_processes, archive_process, gunicorn_hooks,
                        prepare_multiproc_dir, worker_exited)
from .server import MetricsServer
from .spec import SPECS, exported_names
from .wsgi import flush_requests, instrument

__all__ = ["MetricsServer", "SPECS", "archive_dead_processes", "archive_process",
           "exported_names", "flush_requests", "gunicorn_hooks", "instrument",
           "prepare_multiproc_dir", "worker_exited"]
