# syntax=docker/dockerfile:1
# Build stage: turn the source into a wheel (and the wheels of its dependencies).
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway ./gateway
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

# Final stage: no compilers, no source tree, a non-root user.
FROM python:3.11-slim
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin patgate
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links=/wheels patgate && rm -rf /wheels
COPY config/gateway.yaml /etc/patgate/gateway.yaml
ENV PATGATE_CONFIG=/etc/patgate/gateway.yaml \
    PYTHONUNBUFFERED=1
USER 10001
EXPOSE 8080 9191
HEALTHCHECK --interval=10s --timeout=3s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9191/healthz', timeout=2)"]
ENTRYPOINT ["patgate"]
CMD ["serve"]
