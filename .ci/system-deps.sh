#!/usr/bin/env bash
# What the tests need outside Python: Debian's PostgreSQL (real SQL source) and Chromium (UI
# test), Redis (the rate limiter shared across hosts), and Prism from npm (independent OpenAPI
# validator).
# Installs what is missing only when it can: as root, with apt-get. Otherwise (a developer's
# account, macOS) it says what is missing and goes on: the tests that need it are skipped and
# listed at the end of the run, unless MEWS_REQUIRE_ALL_TESTS=1 (CI), which makes them fail.
set -euo pipefail
need=()
command -v make >/dev/null || need+=(make)
# As the tests look for them: PostgreSQL's initdb (start-postgres.sh), an executable Chromium.
pg_bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
[ -n "$pg_bin" ] || pg_bin=$(pg_config --bindir 2>/dev/null || true)
[ -x "$pg_bin/initdb" ] || [ -n "${MEWS_TEST_POSTGRES_URI:-}" ] || need+=(postgresql)
chromium_path=${MEWS_UI_CHROMIUM:-$(command -v chromium || true)}
{ [ -f "$chromium_path" ] && [ -x "$chromium_path" ]; } || need+=(chromium)
command -v redis-server >/dev/null || need+=(redis-server)
if [ ${#need[@]} -eq 0 ]; then
  :
elif [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "installing: ${need[*]}"
  apt-get update -qq
  apt-get install -y -qq "${need[@]}" >/dev/null
else
  echo "system-deps: missing ${need[*]} (not root or no apt-get: not installing)."
  echo "  The tests that need them are skipped and listed at the end. To run them too:"
  echo "  sudo apt-get install ${need[*]}  (or point MEWS_UI_CHROMIUM / MEWS_TEST_POSTGRES_URI at yours)"
fi
# Prism (npm, into .tools/prism: no root needed) for the OpenAPI conformance test.
bash "$(dirname "$0")/prism.sh" || echo "system-deps: Prism could not be installed; the conformance test will be skipped"
