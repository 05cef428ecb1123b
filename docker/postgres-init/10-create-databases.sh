#!/bin/bash
# Creates one role and database per server on the shared PostgreSQL instance.
#
# The postgres image runs the files in /docker-entrypoint-initdb.d once, on the first start with an
# empty data volume. Changing a password in docker/.env later does not change it here: use
# ALTER ROLE ... PASSWORD, or remove the postgres-data volume to start over.
#
#   prefect      Prefect server state (owner: prefect)
#   mlflow       MLflow tracking store and model registry (owner: mlflow)
#   mlflow_auth  MLflow basic-auth users and permissions (owner: mlflow)
set -euo pipefail

: "${PREFECT_DB_PASSWORD:?PREFECT_DB_PASSWORD must be set}"
: "${MLFLOW_DB_PASSWORD:?MLFLOW_DB_PASSWORD must be set}"

# Passwords go in as psql variables and are quoted by psql (:'var'), never pasted into the SQL
# text, so any character is safe. The heredoc is quoted so the shell expands nothing in it.
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres \
    -v prefect_password="$PREFECT_DB_PASSWORD" \
    -v mlflow_password="$MLFLOW_DB_PASSWORD" <<'EOSQL'
CREATE ROLE prefect LOGIN PASSWORD :'prefect_password';
CREATE ROLE mlflow LOGIN PASSWORD :'mlflow_password';
CREATE DATABASE prefect OWNER prefect;
CREATE DATABASE mlflow OWNER mlflow;
CREATE DATABASE mlflow_auth OWNER mlflow;
-- Prefect's migrations need pg_trgm; creating it here as superuser means they never need more
-- than the database owner's rights.
\connect prefect
CREATE EXTENSION IF NOT EXISTS pg_trgm;
EOSQL
