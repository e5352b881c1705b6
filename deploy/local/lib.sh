# Shared settings and helpers of the local stack scripts. Sourced, not run.
#
# Everything listens on 127.0.0.1 only. Override with environment variables:
#   VITALWATCH_STATE_DIR  where logs, pid files and broker data live   (default: <repo>/.local)
#   VITALWATCH_TOOLS_DIR  where tansu is installed, shared across clones (default: ~/.cache/vitalwatch)
#   VITALWATCH_MQTT_PORT  Mosquitto port  (default 18830)
#   VITALWATCH_MQTT_TLS_PORT  Mosquitto TLS port (default 18831)
#   VITALWATCH_KAFKA_PORT tansu port      (default 19092)
#   VITALWATCH_KAFKA_TEST_PORT  the tests' own tansu, in memory (default 19093)
#   VITALWATCH_API_PORT   API port        (default 8080)
#   VITALWATCH_MQTT_PASSWORD  password of the local broker's accounts (default vitalwatch-local)
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
STATE=${VITALWATCH_STATE_DIR:-$REPO/.local}
TOOLS=${VITALWATCH_TOOLS_DIR:-$HOME/.cache/vitalwatch}
MQTT_PORT=${VITALWATCH_MQTT_PORT:-18830}
MQTT_TLS_PORT=${VITALWATCH_MQTT_TLS_PORT:-18831}
KAFKA_PORT=${VITALWATCH_KAFKA_PORT:-19092}
KAFKA_TEST_PORT=${VITALWATCH_KAFKA_TEST_PORT:-19093}
API_PORT=${VITALWATCH_API_PORT:-8080}
MQTT_PASSWORD=${VITALWATCH_MQTT_PASSWORD:-vitalwatch-local}
TANSU_VERSION=0.6.0
TANSU="$TOOLS/tansu-$TANSU_VERSION/bin/tansu"
DB_USER=vitalwatch
DB_PASSWORD=vitalwatch
DB_NAME=vitalwatch
mkdir -p "$STATE"

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; fi

log() { printf '\033[1m[vitalwatch]\033[0m %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# port_open PORT: true when something accepts TCP connections on 127.0.0.1:PORT.
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# wait_port PORT WHAT SECONDS
wait_port() {
    local i
    for ((i = 0; i < $3 * 10; i++)); do
        port_open "$1" && return 0
        sleep 0.1
    done
    die "$2 did not start listening on 127.0.0.1:$1 within $3 s (see the logs in $STATE)"
}

# running PIDFILE: true when the process in PIDFILE is alive.
running() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

# stop_pidfile PIDFILE NAME: SIGTERM, wait up to 20 s, then SIGKILL.
stop_pidfile() {
    local pid i
    running "$1" || { rm -f "$1"; return 0; }
    pid=$(cat "$1")
    log "stopping $2 (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 200; i++)); do
        kill -0 "$pid" 2>/dev/null || { rm -f "$1"; return 0; }
        sleep 0.1
    done
    log "$2 did not stop in 20 s; killing it"
    kill -KILL "$pid" 2>/dev/null || true
    rm -f "$1"
}

# The Debian PostgreSQL cluster's version, name and port (first cluster listed).
pg_cluster() { pg_lsclusters -h 2>/dev/null | awk 'NR == 1 { print $1, $2, $3 }'; }

database_url() {
    local port
    port=$(pg_cluster | awk '{ print $3 }')
    echo "postgres://$DB_USER:$DB_PASSWORD@127.0.0.1:${port:-5432}/$1"
}

# The environment every vitalwatch process of the local stack runs with.
export_stack_env() {
    export VITALWATCH_DATABASE__URL; VITALWATCH_DATABASE__URL=$(database_url "$DB_NAME")
    export VITALWATCH_KAFKA__BROKERS="127.0.0.1:$KAFKA_PORT"
    export VITALWATCH_MQTT__HOST=127.0.0.1
    export VITALWATCH_MQTT__PORT="$MQTT_PORT"
    export VITALWATCH_MQTT__USERNAME=vitalwatch-ingest
    export VITALWATCH_MQTT__PASSWORD="$MQTT_PASSWORD"
    export VITALWATCH_API__LISTEN="127.0.0.1:$API_PORT"
    export VITALWATCH_TEST_DATABASE_URL; VITALWATCH_TEST_DATABASE_URL=$(database_url postgres)
    export VITALWATCH_TEST_KAFKA="127.0.0.1:$KAFKA_TEST_PORT"
    export VITALWATCH_TEST_MQTT="127.0.0.1:$MQTT_PORT"
    export VITALWATCH_TEST_MQTT_PASSWORD="$MQTT_PASSWORD"
    export VITALWATCH_TEST_TANSU="$TANSU"
    export VITALWATCH_TEST_MQTT_TLS="127.0.0.1:$MQTT_TLS_PORT"
    export VITALWATCH_TEST_MQTT_CA="$STATE/tls/ca.crt"
}

# own_pipeline NAME: for a harness (score, load) that runs a release
# `vitalwatch all` of its own: the local PostgreSQL and Mosquitto under the
# topic root NAME/rpm/v1/devices, and the tests' in-memory tansu, which
# takes records far faster than the pipeline's sqlite one. Builds the
# release binaries (BIN), migrates and creates the topics.
own_pipeline() {
    "$REPO/deploy/local/setup" --tests
    export_stack_env
    export VITALWATCH_KAFKA__BROKERS="127.0.0.1:$KAFKA_TEST_PORT"
    export VITALWATCH_MQTT__TOPIC_ROOT="$1/rpm/v1/devices"
    export VITALWATCH_MQTT__SHARE_GROUP="vitalwatch-$1"
    export VITALWATCH_MQTT__CLIENT_ID="vitalwatch-$1"
    export VITALWATCH_API__LISTEN="127.0.0.1:0"
    export VITALWATCH_CONFIG="$REPO/deploy/local/vitalwatch.toml"
    log "building vitalwatch (release)"
    (cd "$REPO" && cargo build --quiet --release --bin vitalwatch --bin vitalwatch-sim)
    BIN="${CARGO_TARGET_DIR:-$REPO/target}/release"
    "$BIN/vitalwatch" migrate >/dev/null
    "$BIN/vitalwatch" topics
}

# start_own_pipeline LOG: starts the release `vitalwatch all` in the
# background (PIPELINE), stopped when the script exits.
start_own_pipeline() {
    log "starting vitalwatch all (release; log: $1)"
    nohup "$BIN/vitalwatch" all >>"$1" 2>&1 &
    PIPELINE=$!
    trap 'kill $PIPELINE 2>/dev/null; wait $PIPELINE 2>/dev/null' EXIT
    sleep 10 # subscribed, and the registry loaded
    kill -0 $PIPELINE 2>/dev/null || die "vitalwatch exited at start-up; see $1"
}
