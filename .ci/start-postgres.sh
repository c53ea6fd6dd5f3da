#!/usr/bin/env bash
# A throw-away PostgreSQL cluster for the tests, on loopback only (Debian's `postgresql` binaries).
#
#   .ci/start-postgres.sh start DIR [PORT]   initdb into DIR (if empty), start it, print its URI
#   .ci/start-postgres.sh stop DIR           stop the cluster in DIR and remove DIR
#
# Listens on 127.0.0.1 only, on PORT (default 55432, or a free port when that one is taken),
# with its socket in DIR. Database `mews`, owned by user `mews` with password `mews`; prints
# postgresql://mews:mews@127.0.0.1:PORT/mews on stdout (everything else goes to stderr).
# Run as root, the cluster runs as the `postgres` OS user (initdb refuses root); otherwise as
# the calling user. Durability is switched off: the data is disposable and speed matters.
set -euo pipefail

usage() { echo "usage: $0 start DIR [PORT] | stop DIR" >&2; exit 2; }
[ $# -ge 2 ] || usage
action=$1
dir=$2

bindir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
if [ -z "$bindir" ] && command -v pg_config >/dev/null; then bindir=$(pg_config --bindir); fi
if [ -z "$bindir" ] || [ ! -x "$bindir/initdb" ]; then
  echo "start-postgres: PostgreSQL server binaries not found (apt-get install postgresql)" >&2
  exit 1
fi

as_owner() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

port_taken() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

case "$action" in
stop)
  if [ -f "$dir/data/PG_VERSION" ]; then
    as_owner "$bindir/pg_ctl" -D "$dir/data" -m immediate -w stop >/dev/null 2>&1 || true
  fi
  rm -rf "$dir"
  exit 0
  ;;
start) ;;
*) usage ;;
esac

mkdir -p "$dir"
chmod 700 "$dir"
if [ "$(id -u)" = 0 ]; then
  chown postgres: "$dir"
  if ! runuser -u postgres -- test -w "$dir"; then
    echo "start-postgres: the postgres user cannot reach $dir; choose a directory under /tmp" >&2
    exit 1
  fi
fi

port=${3:-}
if [ -f "$dir/port" ] && as_owner "$bindir/pg_ctl" -D "$dir/data" status >/dev/null 2>&1; then
  port=$(cat "$dir/port")  # already running: reuse it
else
  if [ -z "$port" ]; then
    port=55432
    if port_taken "$port"; then
      port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    fi
  fi
  if [ ! -f "$dir/data/PG_VERSION" ]; then
    as_owner "$bindir/initdb" -D "$dir/data" -U postgres -E UTF8 --locale=C.UTF-8 \
      --auth-local=trust --auth-host=scram-sha-256 >"$dir/initdb.log" 2>&1 ||
      { cat "$dir/initdb.log" >&2; exit 1; }
  fi
  echo "$port" >"$dir/port"
  opts="-c listen_addresses=127.0.0.1 -c port=$port -c unix_socket_directories=$dir"
  opts+=" -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=50"
  if ! as_owner "$bindir/pg_ctl" -D "$dir/data" -l "$dir/server.log" -o "$opts" -w -t 60 start >/dev/null; then
    cat "$dir/server.log" >&2
    exit 1
  fi
fi

psql=("$bindir/psql" -X -q -v ON_ERROR_STOP=1 -h "$dir" -p "$port" -U postgres -d postgres)
if [ "$(as_owner "${psql[@]}" -tAc "SELECT 1 FROM pg_roles WHERE rolname = 'mews'")" != 1 ]; then
  as_owner "${psql[@]}" -c "CREATE ROLE mews LOGIN PASSWORD 'mews'"
fi
if [ "$(as_owner "${psql[@]}" -tAc "SELECT 1 FROM pg_database WHERE datname = 'mews'")" != 1 ]; then
  as_owner "${psql[@]}" -c "CREATE DATABASE mews OWNER mews"
fi
echo "postgresql://mews:mews@127.0.0.1:$port/mews"
