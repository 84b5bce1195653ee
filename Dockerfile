# hostsvc: many Python web apps in one container (nginx in front, one gunicorn pool per app).
# Build:  docker build -t hostsvc .            Run: docker run --rm -p 8080:8080 hostsvc
# Guide:  docs/deploy.md ("Run in Docker").
ARG PYTHON_IMAGE=python:3.11-slim

# -- builder: wheels for the pinned dependencies and hostsvc itself, installed into a venv ---------
FROM ${PYTHON_IMAGE} AS builder
ARG DEBIAN_FRONTEND=noninteractive
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
# hostsvc has one C module (the request metrics' hot path): a compiler, and Python's headers
# where the base image lacks them (python:3.11-slim has them; a Debian python3 needs -dev).
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && { [ -f "$(python -c 'import sysconfig; print(sysconfig.get_path("include"))')/Python.h" ] \
      || apt-get install -y --no-install-recommends python3-dev; } \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY requirements.lock ./
RUN python -m pip wheel --no-deps --wheel-dir /wheels -r requirements.lock
COPY pyproject.toml README.md* ./
COPY hostsvc ./hostsvc
RUN python -m pip wheel --no-deps --wheel-dir /wheels . \
 && python -m venv /opt/hostsvc \
 && /opt/hostsvc/bin/pip install --no-index --find-links /wheels -r requirements.lock "hostsvc[redis,granian]" \
 && /opt/hostsvc/bin/pip uninstall -y pip setuptools \
 && /opt/hostsvc/bin/python -c "import hostsvc.cli, gunicorn, granian, yaml, prometheus_client, multipart, redis"

# -- final: python + nginx + tini + the venv; no compilers, no pip cache, no apt lists ------------
FROM ${PYTHON_IMAGE}
ARG DEBIAN_FRONTEND=noninteractive
# Debian stable only ships security fixes, and its mirrors drop superseded versions, so an
# apt version pin would break the build at the next security update: pin the base image instead.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends nginx-light tini \
 && apt-get clean \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb /var/log/nginx/* /etc/nginx/sites-enabled/* \
 && groupadd --system --gid 10001 hostsvc \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin hostsvc \
 && mkdir -p /etc/hostsvc /srv/apps /run/hostsvc /var/lib/hostsvc \
 && chown 10001:10001 /run/hostsvc /var/lib/hostsvc

COPY --from=builder /opt/hostsvc /opt/hostsvc
COPY apps/ /usr/share/hostsvc/apps/
COPY deploy/container/hostsvc.yaml /etc/hostsvc/hostsvc.yaml
COPY --chmod=0755 deploy/container/entrypoint.sh /usr/local/bin/hostsvc-entrypoint
COPY --chmod=0755 deploy/container/healthcheck.py /usr/local/bin/hostsvc-healthcheck

# Every setting has an environment variable (the bundled config reads the HOSTSVC_* ones with
# ${VAR:-default}; the entrypoint reads HOSTSVC_CONFIG, HOSTSVC_RUNTIME_DIR and HOSTSVC_WATCH).
ENV PATH=/opt/hostsvc/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONPATH=/srv/apps \
    HOSTSVC_CONFIG=/etc/hostsvc/hostsvc.yaml \
    HOSTSVC_RUNTIME_DIR=/run/hostsvc \
    HOSTSVC_LISTEN=0.0.0.0:8080 \
    HOSTSVC_METRICS_LISTEN=0.0.0.0:9090 \
    HOSTSVC_EXAMPLES=/usr/share/hostsvc/apps \
    HOSTSVC_DATA_DIR=/var/lib/hostsvc \
    HOSTSVC_WATCH=

# The config dir and the user apps are meant to be mounted; hostsvc writes only to the runtime
# dir (sockets, the generated nginx.conf, state.json) and the example apps' data dir, both
# volumes owned by uid 10001, so the root filesystem can be read-only (docker run --read-only).
VOLUME ["/etc/hostsvc", "/srv/apps", "/run/hostsvc", "/var/lib/hostsvc"]
WORKDIR /run/hostsvc
USER 10001:10001
EXPOSE 8080 9090

# /healthz is served on the metrics listener (HOSTSVC_METRICS_LISTEN); python's urllib, no curl.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
  CMD ["hostsvc-healthcheck"]

# tini is PID 1: it forwards SIGTERM/SIGHUP to the supervisor and reaps orphaned zombies.
ENTRYPOINT ["/usr/bin/tini", "--", "hostsvc-entrypoint"]
CMD []
