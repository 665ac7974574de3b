# costwall gateway image. Build: docker build -t costwall .   Run: see docker-compose.yml.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway ./gateway
COPY admin ./admin
RUN pip install ".[postgres,fast]" && rm -rf /src

COPY config/pricing.yaml /etc/costwall/pricing.yaml
COPY config/compose/costwall.yaml /etc/costwall/costwall.yaml

# An unprivileged user owns the one writable place: /data (database, audit logs, invoices).
RUN useradd --system --uid 10001 --user-group --home-dir /data --shell /usr/sbin/nologin costwall \
    && mkdir -p /data/logs /data/reports \
    && chown -R costwall:costwall /data
ENV COSTWALL_DB=sqlite:////data/costwall.db \
    COSTWALL_LOG_DIR=/data/logs \
    COSTWALL_REPORTS_DIR=/data/reports
VOLUME ["/data"]
USER costwall
WORKDIR /data
EXPOSE 8080

# /healthz: the process is up. (Orchestrators should route traffic on /readyz.)
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2)"]

# SIGTERM drains: in-flight streams finish (limits.shutdown_grace_s), their cost is settled and
# the ledger flushed before exit. Give the container a longer stop timeout than the grace.
STOPSIGNAL SIGTERM
CMD ["costwall", "serve", "--config", "/etc/costwall/costwall.yaml", "--host", "0.0.0.0"]
