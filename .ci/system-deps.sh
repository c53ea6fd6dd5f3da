#!/usr/bin/env bash
# Debian packages the tests need: PostgreSQL (real SQL source), Chromium (UI test) and Redis
# (the rate limiter shared across hosts).
set -euo pipefail
need=()
command -v make >/dev/null || need+=(make)
[ -x /usr/lib/postgresql/*/bin/initdb ] 2>/dev/null || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
command -v chromium >/dev/null || need+=(chromium)
command -v redis-server >/dev/null || need+=(redis-server)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing: ${need[*]}"
  apt-get update -qq
  apt-get install -y -qq "${need[@]}" >/dev/null
fi
