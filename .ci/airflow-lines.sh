#!/usr/bin/env bash
# Every declared Airflow line but 3.3 (that one is `make test`'s environment): one leg each
# (.ci/airflow-line.sh LINE), two at a time, sharing pip's download cache (its default, or PIP_CACHE_DIR). Prints a PASS/FAIL
# table with each leg's duration and fails if any leg failed.
# Logs: .artifacts/airflow-lines/LINE.log (and each leg's .artifacts/airflow-LINE/).
# Env: AIRFLOW_LINES ("2.11 3.0 3.1 3.2"), AIRFLOW_LINES_PARALLEL (2).
set -uo pipefail
cd "$(dirname "$0")/.."
read -r -a LINES <<<"${AIRFLOW_LINES:-2.11 3.0 3.1 3.2}"
PARALLEL="${AIRFLOW_LINES_PARALLEL:-2}"
LOGS=.artifacts/airflow-lines
rm -rf "$LOGS"
mkdir -p "$LOGS"

run_leg() {
  local line=$1 start rc
  start=$(date +%s)
  bash .ci/airflow-line.sh "$line" >"$LOGS/$line.log" 2>&1
  rc=$?
  echo "$rc $(($(date +%s) - start))" >"$LOGS/$line.result"
  echo "-- Airflow $line: $([ "$rc" = 0 ] && echo PASS || echo "FAIL (exit $rc)") in $(($(date +%s) - start)) s"
}

echo "== Airflow lines ${LINES[*]}: $PARALLEL at a time, logs in $LOGS/"
START=$(date +%s)
for line in "${LINES[@]}"; do
  while [ "$(jobs -rp | wc -l)" -ge "$PARALLEL" ]; do wait -n; done
  run_leg "$line" &
done
wait
TOTAL=$(($(date +%s) - START))

FAILED=0
printf '\n%-6s %-6s %8s  %-30s %s\n' line result seconds "unit tests" log
for line in "${LINES[@]}"; do
  read -r rc secs <"$LOGS/$line.result" 2>/dev/null || { rc=1 secs=?; }
  result=PASS
  if [ "$rc" != 0 ]; then result=FAIL FAILED=1; fi
  tests=$(grep -E '^[0-9]+ (passed|failed)' "$LOGS/$line.log" | tail -1 | sed 's/ in .*//')
  printf '%-6s %-6s %8s  %-30s %s\n' "$line" "$result" "$secs" "${tests:-none}" "$LOGS/$line.log"
done
printf '%-6s %-6s %8s  (wall time, %s at a time)\n' all "$([ $FAILED = 0 ] && echo PASS || echo FAIL)" "$TOTAL" "$PARALLEL"
for line in "${LINES[@]}"; do
  read -r rc _ <"$LOGS/$line.result" 2>/dev/null || rc=1
  if [ "$rc" != 0 ]; then
    echo
    echo "== Airflow $line failed; the end of $LOGS/$line.log:"
    tail -60 "$LOGS/$line.log"
  fi
done
exit $FAILED
