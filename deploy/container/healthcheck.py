#!/usr/bin/env python3
"""The image's HEALTHCHECK: GET /healthz on the metrics listener; exit 0 on a 2xx answer, else 1.

Python's urllib, so the image needs no curl. The listener is HOSTSVC_METRICS_LISTEN (the
default of the config's metrics.listen; the image sets 0.0.0.0:9090), asked on loopback when
it binds every interface. HOSTSVC_HEALTHCHECK_URL overrides the whole URL.
"""
import os
import sys
import urllib.error
import urllib.request


def healthz_url() -> str:
    if os.environ.get("HOSTSVC_HEALTHCHECK_URL"):
        return os.environ["HOSTSVC_HEALTHCHECK_URL"]
    host, _, port = (os.environ.get("HOSTSVC_METRICS_LISTEN") or "9090").rpartition(":")
    host = host.strip("[]")
    if host in ("", "0.0.0.0", "::", "*"):
        host = "127.0.0.1"
    elif ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}/healthz"


url = healthz_url()
try:
    with urllib.request.urlopen(url, timeout=float(os.environ.get("HOSTSVC_HEALTHCHECK_TIMEOUT", "4"))) as resp:
        print(f"{url}: {resp.status}")
        sys.exit(0 if 200 <= resp.status < 300 else 1)
except urllib.error.HTTPError as exc:
    print(f"{url}: {exc.code} {exc.reason}", file=sys.stderr)
except (OSError, ValueError) as exc:
    print(f"{url}: {exc}", file=sys.stderr)
sys.exit(1)
