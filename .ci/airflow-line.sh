#!/usr/bin/env bash
# One Airflow line's compatibility leg: `bash .ci/airflow-line.sh 3.0` (any line with a
# constraints/airflow-X.Y.txt; 3.3 is `make test`'s own environment). In its own virtualenv
# (.venv-X.Y), pinned by constraints/airflow-X.Y.txt:
#   1. the provider imports, and each name of version_compat comes from where the line keeps it;
#   2. the unit tests that do not need a newer Airflow;
#   3. the Mews connection form as that line's UI builds it, and `airflow connections test` with the
#      right and a wrong token; the SQLite example DAG end to end (`airflow dags test`); a retried try
#      that must reconcile through getAll instead of adding again (.ci/airflow-line-e2e.py).
# Logs: .artifacts/airflow-X.Y/. Env: AIRFLOW_LINE_PYTHON (interpreter), AIRFLOW_LINE_VENV (venv dir).
set -euo pipefail
LINE="${1:?usage: $0 AIRFLOW_LINE (e.g. 3.0)}"
cd "$(dirname "$0")/.."
ROOT="$PWD"
CONSTRAINTS="constraints/airflow-$LINE.txt"
[ -f "$CONSTRAINTS" ] || { echo "airflow-$LINE: no $CONSTRAINTS" >&2; exit 2; }
VENV="${AIRFLOW_LINE_VENV:-.venv-$LINE}"
ARTIFACTS="$ROOT/.artifacts/airflow-$LINE"
mkdir -p "$ARTIFACTS"

# Unit tests that hold on every line. Left out: test_postgres (needs the Postgres provider, which
# these environments leave out), test_operator, test_provider, test_lineage and test_secrets (written
# against Airflow 3.3: its task state store, conn-fields form, asset events, OpenLineage and task
# supervisor); on each line .ci/airflow-line-e2e.py runs the operator, the form and the connection
# test instead. A listed file that is missing fails the leg (a move must update this list).
TESTS=(tests/hooks/test_hook.py tests/loyalty/test_normalize.py tests/testing/test_sandbox.py tests/loyalty/test_batches.py
  tests/loyalty/test_names.py tests/transfers/test_export_slices.py)
# test_smoke_examples runs an example DAG with dag.test(), which on 3.0 refuses the operator's
# (unregistered) asset outlet; on 3.0 the e2e runs the example DAG after `airflow dags reserialize`.
[ "$LINE" = 3.0 ] || TESTS+=(tests/test_smoke_examples.py)

pick_python() {
  local c
  for c in "${AIRFLOW_LINE_PYTHON:-}" python3.11 python3.12 python3.10 "${PYTHON:-python3}" python3; do
    [ -n "$c" ] && command -v "$c" >/dev/null 2>&1 || continue
    # Python 3.10-3.12 is supported by every Airflow line from 2.11 to 3.3 and by this project.
    if "$c" -c 'import sys; sys.exit(not (3, 10) <= sys.version_info[:2] <= (3, 12))'; then
      echo "$c"
      return
    fi
  done
  echo "airflow-$LINE: no Python 3.10-3.12 found (set AIRFLOW_LINE_PYTHON)" >&2
  exit 1
}

echo "== Airflow $LINE: virtualenv $VENV"
STAMP="$VENV/.installed"
if [ ! -f "$STAMP" ] || [ "$CONSTRAINTS" -nt "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ]; then
  PY_BASE="$(pick_python)"
  rm -rf "$VENV"
  "$PY_BASE" -m venv "$VENV"
  # The SQLite provider and the test tools by name: they need not be runtime dependencies.
  {
    "$VENV/bin/pip" install --quiet --upgrade pip
    "$VENV/bin/pip" install --quiet -c "$CONSTRAINTS" -e . apache-airflow-providers-sqlite \
      pytest pytest-timeout hypothesis jsonschema psutil rfc3339-validator rfc3986-validator
  } >"$ARTIFACTS/pip-install.log" 2>&1 || { tail -40 "$ARTIFACTS/pip-install.log"; exit 1; }
  "$VENV/bin/pip" check
  touch "$STAMP"
fi
PY="$VENV/bin/python"

WORK="$(mktemp -d "${TMPDIR:-/tmp}/mews-af$LINE-XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
export AIRFLOW_HOME="$WORK/airflow"
export AIRFLOW__CORE__DAGS_FOLDER="$WORK/dags"
export AIRFLOW__CORE__LOAD_EXAMPLES=False
export AIRFLOW__CORE__TEST_CONNECTION=Enabled
export AIRFLOW_LINE="$LINE" ARTIFACTS WORK
mkdir -p "$AIRFLOW__CORE__DAGS_FOLDER"

echo "== Airflow $LINE: import, and where each compat name comes from"
"$PY" .ci/airflow-line-e2e.py imports

echo "== Airflow $LINE: unit tests"
RUN_TESTS=()
for t in "${TESTS[@]}"; do
  [ -f "$t" ] || { echo "airflow-$LINE: $t is listed but missing: update TESTS in .ci/airflow-line.sh" >&2; exit 2; }
  RUN_TESTS+=("$t")
done
# The tests make their own Airflow home (tests/conftest.py); keep this leg's apart from it.
env -u AIRFLOW_HOME -u AIRFLOW__CORE__DAGS_FOLDER "$PY" -m pytest -q -p no:cacheprovider "${RUN_TESTS[@]}"

echo "== Airflow $LINE: airflow db migrate"
"$VENV/bin/airflow" db migrate >"$ARTIFACTS/db-migrate.log" 2>&1 || { tail -40 "$ARTIFACTS/db-migrate.log"; exit 1; }

echo "== Airflow $LINE: connection form, connections test, example DAG and a retried try"
cp dags_examples/mews_loyalty_from_sqlite.py "$AIRFLOW__CORE__DAGS_FOLDER/"
AIRFLOW_BIN="$(cd "$VENV" && pwd)/bin/airflow" "$PY" -W ignore::DeprecationWarning -W ignore::FutureWarning \
  .ci/airflow-line-e2e.py e2e
echo "== Airflow $LINE: all passed"
