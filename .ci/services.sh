# Sourced by .ci/run: starts the services the tests use and exports how to reach them.
# PostgreSQL: a throw-away cluster on loopback, unless MEWS_TEST_POSTGRES_URI is already set.
# The cluster is stopped and its directory removed when the sourcing shell exits.
# Without PostgreSQL's server binaries (and not required: MEWS_REQUIRE_ALL_TESTS), nothing is
# started and the Postgres tests skip, saying how to enable them.
MEWS_CI_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
if [ -z "${MEWS_TEST_POSTGRES_URI:-}" ] && [ "${MEWS_REQUIRE_ALL_TESTS:-0}" != 1 ] &&
  ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && ! command -v pg_config >/dev/null; then
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
