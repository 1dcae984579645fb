# syntax=docker/dockerfile:1
# patgate: docker build -t patgate:0.1.0 .
# The image runs `patgate serve` as UID 10001 with the config at /etc/patgate/gateway.yaml
# (PATGATE_CONFIG); mount your own over it. deploy/kubernetes/ shows it as a native sidecar.

# Build stage: the wheel of patgate and the wheels of all its dependencies (asyncpg, uvloop
# and orjson come as manylinux wheels, so nothing is compiled; were anything to be, the
# toolchain would stay in this stage).
FROM python:3.11-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway ./gateway
RUN pip wheel --no-cache-dir --disable-pip-version-check --wheel-dir /wheels .

# Final stage: the same slim base, wheels only (--no-index: nothing is fetched or built
# here), no compilers, no source tree, a non-root numeric user.
FROM python:3.11-slim-bookworm
LABEL org.opencontainers.image.title="patgate" \
      org.opencontainers.image.description="Reverse-proxy authentication gateway for Personal Access Tokens" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATGATE_CONFIG=/etc/patgate/gateway.yaml
RUN groupadd --system --gid 10001 patgate \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin patgate
# Exactly the wheels the build stage resolved, bind-mounted so they never become a layer.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --disable-pip-version-check --no-index /wheels/*.whl
COPY config/gateway.yaml /etc/patgate/gateway.yaml
WORKDIR /tmp
USER 10001:10001
# 8080: the proxy, /_patgate/api and /_patgate/ui. 9191: /healthz /readyz /metrics.
EXPOSE 8080 9191
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('PATGATE_ADMIN_PORT', '9191'), timeout=2)"]
ENTRYPOINT ["patgate"]
CMD ["serve"]
