# Sourced by .ci/run: starts the services the tests use and exports how to reach them.
# PostgreSQL: a throw-away cluster on loopback, unless MEWS_TEST_POSTGRES_URI is already set.
