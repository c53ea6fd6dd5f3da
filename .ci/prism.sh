#!/usr/bin/env bash
# Stoplight Prism, the independent OpenAPI validator of tests/testing/test_conformance.py (a validating
# proxy in front of the sandbox), from npm into .tools/prism/ (no root needed; node and npm are).
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=5.16.0
DIR=.tools/prism
BIN="$DIR/node_modules/.bin/prism"
if [ -x "$BIN" ] && [ "$("$BIN" --version 2>/dev/null)" = "$VERSION" ]; then exit 0; fi
if ! command -v npm >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && apt-get install -y -qq nodejs npm >/dev/null
  else
    echo "prism: npm not found: the conformance test is skipped (install node and npm, then bash .ci/prism.sh)"
    exit 0
  fi
fi
echo "installing @stoplight/prism-cli@$VERSION into $DIR"
mkdir -p "$DIR"
npm install --prefix "$DIR" --no-audit --no-fund --silent "@stoplight/prism-cli@$VERSION" >/dev/null
"$BIN" --version >/dev/null
