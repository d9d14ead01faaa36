#!/usr/bin/env bash
# Install (when missing) and start the servers aiso's tests and `aiso dev` use: RabbitMQ and
# PostgreSQL from Debian's packages, on loopback. Idempotent: running servers are left alone.
#
#   hack/servers.sh install [dev|rabbitmq|postgresql]   apt-get install what is missing
#                             (dev: RabbitMQ and espeak-ng, what `aiso dev` runs on)
#   hack/servers.sh start     install and start both, create the aiso PostgreSQL role and db
#   hack/servers.sh stop      stop both
#   hack/servers.sh env       print AISO_TEST_POSTGRES_URL for the tests
set -euo pipefail

PG_URL="postgresql+asyncpg://aiso:aiso@127.0.0.1:5432/aiso"

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

install() {
  local want=${1:-all} missing=()
  if [ "$want" != postgresql ]; then
    command -v rabbitmq-server >/dev/null || [ -x /usr/sbin/rabbitmq-server ] || missing+=(rabbitmq-server)
  fi
  if [ "$want" = all ] || [ "$want" = postgresql ]; then
    ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || missing+=(postgresql)
  fi
  if [ "$want" = all ] || [ "$want" = dev ]; then
    command -v espeak-ng >/dev/null || missing+=(espeak-ng)
  fi
  [ ${#missing[@]} -eq 0 ] && return
  if ! command -v apt-get >/dev/null; then
    echo "aiso needs ${missing[*]}; install it with your package manager" \
      "(e.g. brew install rabbitmq) or point AISO_AMQP_URL at a running broker." >&2
    exit 1
  fi
  if [ "$(id -u)" != 0 ] && ! sudo -n true 2>/dev/null; then
    echo "about to run: sudo apt-get install -y ${missing[*]}"
  fi
  echo "installing ${missing[*]}"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

rabbit_up() { as_root rabbitmqctl -q status >/dev/null 2>&1; }

RABBIT_LOG=${TMPDIR:-/tmp}/aiso-rabbitmq.log

start_rabbitmq() {
  if rabbit_up; then return; fi
  echo "starting RabbitMQ (log: $RABBIT_LOG)"
  # Started in the background rather than with -detached: `-detached` returns before the node
  # registers with epmd, and `rabbitmqctl await_startup` gives up at once on a node it cannot
  # see yet, so a first boot (which creates the database) raced it.
  as_root env RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 nohup rabbitmq-server >"$RABBIT_LOG" 2>&1 &
  local pid=$! waited=0
  until rabbit_up; do
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "RabbitMQ exited while starting; its output:" >&2
      tail -n 40 "$RABBIT_LOG" >&2
      exit 1
    fi
    if [ "$waited" -ge 180 ]; then
      echo "RabbitMQ did not start within 180 s; its output:" >&2
      tail -n 40 "$RABBIT_LOG" >&2
      exit 1
    fi
    sleep 1
    waited=$((waited + 1))
  done
  as_root rabbitmqctl -q await_startup --timeout 120
}

pg_cluster() { ls -d /etc/postgresql/*/main 2>/dev/null | head -1; }

start_postgres() {
  local conf version
  conf=$(pg_cluster)
  if [ -z "$conf" ]; then
    version=$(ls /usr/lib/postgresql | sort -n | tail -1)
    as_root pg_createcluster "$version" main >/dev/null
    conf=$(pg_cluster)
  fi
  version=$(basename "$(dirname "$conf")")
  if ! as_root pg_ctlcluster "$version" main status >/dev/null 2>&1; then
    echo "starting PostgreSQL $version"
    as_root pg_ctlcluster "$version" main start
  fi
  as_root su postgres -c "psql -qtAc \"SELECT 1 FROM pg_roles WHERE rolname='aiso'\"" | grep -q 1 \
    || as_root su postgres -c "psql -qc \"CREATE ROLE aiso LOGIN PASSWORD 'aiso' CREATEDB\""
  as_root su postgres -c "psql -qtAc \"SELECT 1 FROM pg_database WHERE datname='aiso'\"" | grep -q 1 \
    || as_root su postgres -c "createdb -O aiso aiso"
}

stop() {
  as_root rabbitmqctl -q stop >/dev/null 2>&1 || true
  local conf; conf=$(pg_cluster)
  [ -n "$conf" ] && as_root pg_ctlcluster "$(basename "$(dirname "$conf")")" main stop >/dev/null 2>&1 || true
}

case "${1:-start}" in
  install) install "${2:-all}" ;;
  start) install; start_rabbitmq; start_postgres ;;
  stop) stop ;;
  env) echo "export AISO_TEST_POSTGRES_URL=$PG_URL" ;;
  *) echo "usage: $0 install|start|stop|env" >&2; exit 2 ;;
esac
