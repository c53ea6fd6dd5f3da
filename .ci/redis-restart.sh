#!/usr/bin/env bash
# Issue 21.3: the limiter's Redis killed and started again (empty) while CeleryExecutor workers
# share one AccessToken through it (benchmarks/redis_restart.py): api-server, scheduler,
# dag-processor, 2 Celery workers (broker and results on one redis-server, the limiter's state on a
# second one, which is the one killed), 12 000 rows in 4 shards against the sandbox (20 requests / 3 s).
# Fails (exit 1, "REDIS RESTART PROOF FAILED: ...") unless: the DAG run succeeded on both workers,
# every row is in Mews once and in the results table once, each try that lost Redis logged the
# fallback once and, when it ran on, its return once, and the restarted Redis holds the token's state.
# About 90 s. Result: benchmarks/results/redis-restart.json; logs: .artifacts/redis-restart/.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${SCALE_OUT_PYTHON:-.venv/bin/python}"

if ! command -v redis-server >/dev/null; then
  echo "installing: redis-server"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
fi
"$PY" -c 'import airflow.providers.celery, airflow.providers.redis' 2>/dev/null || {
  echo "redis-restart: the Celery or Redis provider is missing from $PY (both are in the dev extra)" >&2
  exit 1
}
echo "== Redis restart under CeleryExecutor (load: $(cut -d' ' -f1-3 /proc/loadavg))"
"$PY" -m benchmarks.redis_restart
