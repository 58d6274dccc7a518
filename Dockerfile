# RaftKV node image: storage engine + Raft sidecar, started by entrypoint.sh.
# Build: docker build -t raftkv .      Run a 3-node cluster: docker compose up --build
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
# Sources first (entrypoint.sh last, so editing it does not reinstall the package).
# README.m[d]: the glob keeps the build working in a checkout without a README.
COPY pyproject.toml README.m[d] ./
COPY proto ./proto
COPY raftkv ./raftkv
COPY storage_engine ./storage_engine
COPY raft_sidecar ./raft_sidecar
RUN pip install . && cd / && rm -rf /src

WORKDIR /app
COPY entrypoint.sh /app/entrypoint.sh
RUN chmod 0755 /app/entrypoint.sh && mkdir -p /app/data

# Defaults of entrypoint.sh, spelled out; override per container (see docker-compose.yml).
ENV DATA_DIR=/app/data \
    HTTP_PORT=8080 \
    RAFT_PORT=8088 \
    MGMT_PORT=6000 \
    PYTHON=python3

VOLUME ["/app/data"]
# client HTTP, Raft, management HTTP (the gRPC ports 50051/50052 stay on loopback)
EXPOSE 8080 8088 6000

# Healthy = this node knows a leader and its engine answers (sidecar GET /health).
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD python3 -c "import os,sys,urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('MGMT_PORT','6000'), timeout=2); sys.exit(0)" || exit 1

ENTRYPOINT ["/app/entrypoint.sh"]
