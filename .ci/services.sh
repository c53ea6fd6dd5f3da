# Sourced by .ci/run: starts the services the tests use and exports how to reach them.
# PostgreSQL: a throw-away cluster on loopback, unless MEWS_TEST_POSTGRES_URI is already set.
# The cluster is stopped and its directory removed when the sourcing shell exits.
# Without PostgreSQL's server binaries (and not required: MEWS_REQUIRE_ALL_TESTS), nothing is
# started and the Postgres tests skip, saying how to enable them.
MEWS_CI_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
MEWS_PG_BIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
[ -n "$MEWS_PG_BIN" ] || MEWS_PG_BIN=$(pg_config --bindir 2>/dev/null || true)
if [ -z "${MEWS_TEST_POSTGRES_URI:-}" ] && [ "${MEWS_REQUIRE_ALL_TESTS:-0}" != 1 ] && [ ! -x "$MEWS_PG_BIN/initdb" ]; then
  echo "PostgreSQL for the tests: none (server binaries not found); the Postgres tests will be skipped"
elif [ -z "${MEWS_TEST_POSTGRES_URI:-}" ]; then
  MEWS_CI_POSTGRES_DIR=$(mktemp -d /tmp/mews-ci-postgres.XXXXXX)
  trap 'bash "$MEWS_CI_DIR/start-postgres.sh" stop "$MEWS_CI_POSTGRES_DIR"' EXIT
  MEWS_TEST_POSTGRES_URI=$(bash "$MEWS_CI_DIR/start-postgres.sh" start "$MEWS_CI_POSTGRES_DIR")
  export MEWS_TEST_POSTGRES_URI
  echo "PostgreSQL for the tests: $MEWS_TEST_POSTGRES_URI (cluster in $MEWS_CI_POSTGRES_DIR)"
else
  echo "PostgreSQL for the tests: given by MEWS_TEST_POSTGRES_URI"
fi
