# kpimon image: the `kpimon` console script (worker, simulate, backtest, rules check).
# Build:  docker build -t kpimon .
# Run:    docker run --rm -e KPIMON_KAFKA_BOOTSTRAP=host:9092 -p 9108:9108 kpimon

FROM python:3.11-slim AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /src
# README.md is optional at build time (the wildcard tolerates its absence).
COPY pyproject.toml README.md* ./
COPY stream ./stream
COPY alerts ./alerts
RUN pip install --upgrade pip \
    && pip install . \
    && test -x /opt/venv/bin/kpimon


FROM python:3.11-slim

LABEL org.opencontainers.image.title="kpimon" \
      org.opencontainers.image.description="Real-time marketing KPI monitor" \
      org.opencontainers.image.licenses="Apache-2.0"

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    KPIMON_METRICS_PORT=9108 \
    KPIMON_STATE_DIR=/data

RUN groupadd --system --gid 10001 kpimon \
    && useradd --system --uid 10001 --gid kpimon --home-dir /home/kpimon --create-home \
       --shell /usr/sbin/nologin kpimon \
    && mkdir -p /data \
    && chown kpimon:kpimon /data

COPY --from=build /opt/venv /opt/venv

USER kpimon:kpimon
WORKDIR /home/kpimon

EXPOSE 9108

# No HEALTHCHECK here: the same image runs the simulator, which serves no /metrics.
# docker-compose.yml gives the worker service its own health check.
CMD ["kpimon", "worker"]
