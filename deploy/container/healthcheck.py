#!/usr/bin/env python3
"""The image's HEALTHCHECK: GET /healthz on the metrics port; exit 0 on a 2xx answer, else 1.

Python's urllib, so the image needs no curl. HOSTSVC_HEALTHCHECK_URL overrides the URL
(default http://127.0.0.1:$HOSTSVC_METRICS_PORT/healthz, port 9090).
"""
import os
import sys
import urllib.error
import urllib.request

url = os.environ.get("HOSTSVC_HEALTHCHECK_URL") or \
    f"http://127.0.0.1:{os.environ.get('HOSTSVC_METRICS_PORT') or '9090'}/healthz"
try:
    with urllib.request.urlopen(url, timeout=float(os.environ.get("HOSTSVC_HEALTHCHECK_TIMEOUT", "4"))) as resp:
        print(f"{url}: {resp.status}")
        sys.exit(0 if 200 <= resp.status < 300 else 1)
except urllib.error.HTTPError as exc:
    print(f"{url}: {exc.code} {exc.reason}", file=sys.stderr)
except (OSError, ValueError) as exc:
    print(f"{url}: {exc}", file=sys.stderr)
sys.exit(1)
