#!/usr/bin/env bash
# The local MLflow tracking server and UI over the pipeline's default store.
#
# This folder holds data, not Python: never add an __init__.py here (it would shadow the mlflow
# package for code run from the repo root).
#   mlflow/mlflow.db     sqlite backend store: experiments, runs, metrics, the model registry
#   mlflow/artifacts/    artifacts: loss curves, evaluation tables, the registered adapters
# Both are git-ignored and created on first use. With `registry.tracking_uri` (and MLFLOW_TRACKING_URI)
# unset, the pipeline writes to them directly (no server needed): to $QLORA_PIPELINE_DIR/mlflow/ when
# that is set, else to mlflow/ of the working directory, which is this folder for `make demo` run from
# the repo root. This script serves the same folder for browsing, and gives other processes an HTTP
# endpoint (registry.tracking_uri=http://127.0.0.1:5000).
#
# Usage: make mlflow-ui            (or: bash mlflow/server.sh [extra `mlflow server` options])
#   MLFLOW_PORT  port, default 5000      MLFLOW_HOST  interface, default 127.0.0.1 (this machine only)
#   MLFLOW_WORKERS  server worker processes, default 1 (enough for one person browsing)
#   QLORA_MLFLOW_DIR  serve another folder's mlflow.db + artifacts/ (tests use this); default
#                     $QLORA_PIPELINE_DIR/mlflow when QLORA_PIPELINE_DIR is set, else this folder
# A shared setup (PostgreSQL backend, proxied artifact storage, basic auth) is docker/compose.yaml.
set -euo pipefail

if [[ -n "${QLORA_MLFLOW_DIR:-}" ]]; then
    HERE="$QLORA_MLFLOW_DIR"
elif [[ -n "${QLORA_PIPELINE_DIR:-}" ]]; then
    HERE="$QLORA_PIPELINE_DIR/mlflow"
else
    HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"
fi
mkdir -p "$HERE/artifacts"
HERE="$(cd "$HERE" && pwd -P)"  # physical path, as the pipeline resolves it
command -v mlflow >/dev/null 2>&1 || { echo "mlflow not found: run 'make install' or activate .venv" >&2; exit 1; }

HOST="${MLFLOW_HOST:-127.0.0.1}"
PORT="${MLFLOW_PORT:-5000}"
echo "MLflow UI: http://${HOST}:${PORT}  (store: $HERE/mlflow.db; Ctrl-C stops)"
# --serve-artifacts: clients talking to this server upload/download artifacts through it
# (mlflow-artifacts:/ URIs stored under mlflow/artifacts); runs the pipeline logged directly keep
# their file paths under mlflow/artifacts, which this server reads on the same machine.
exec mlflow server \
    --backend-store-uri "sqlite:///$HERE/mlflow.db" \
    --artifacts-destination "$HERE/artifacts" \
    --serve-artifacts \
    --host "$HOST" \
    --port "$PORT" \
    --workers "${MLFLOW_WORKERS:-1}" \
    "$@"
