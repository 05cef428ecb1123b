# MLflow tracking server + model registry with basic auth and a PostgreSQL backend.
#
# Build context is the repository root (compose uses `context: ..`):
#   docker build -f docker/server.Dockerfile -t qlora-mlflow .
#
# The official image is python:3.11-slim plus `mlflow` only. It lacks:
#   - the `auth` extra (Flask-WTF) that `mlflow server --app-name basic-auth` needs, and
#   - a PostgreSQL driver (psycopg2) for the backend store and the auth database.
# MLflow is pinned to the version the project is developed and tested against, so the server is
# never older than the client (older servers may reject fields newer clients send).
FROM ghcr.io/mlflow/mlflow:v3.17.2

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN pip install "mlflow[auth]==3.17.2" "psycopg2-binary==2.9.13"

# Auth settings without secrets: the admin user/password (MLFLOW_AUTH_ADMIN_USERNAME /
# MLFLOW_AUTH_ADMIN_PASSWORD) and the database password (PGPASSWORD) come from the environment.
COPY docker/mlflow-auth.ini /etc/mlflow/auth.ini
ENV MLFLOW_AUTH_CONFIG_PATH=/etc/mlflow/auth.ini

# Non-root user owning the artifact directory; the named volume mounted there starts with this
# ownership.
RUN groupadd --system --gid 10002 mlflow \
    && useradd --system --uid 10002 --gid mlflow --no-create-home mlflow \
    && mkdir -p /mlflow/artifacts \
    && chown -R mlflow:mlflow /mlflow
WORKDIR /mlflow
USER 10002:10002

EXPOSE 5000

# compose.yaml passes the full command (backend store, artifacts, host); this default is the same
# without a backend store and is here so the image never starts without authentication.
CMD ["mlflow", "server", "--app-name", "basic-auth", "--host", "0.0.0.0", "--port", "5000", \
     "--serve-artifacts", "--artifacts-destination", "/mlflow/artifacts"]
