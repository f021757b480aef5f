#!/usr/bin/env bash
# Toxiproxy for the fault tests (tests/faults): a TCP proxy whose links can be slowed, cut or
# black-holed through an HTTP API. The tests create their own proxies in front of Redis and
# ClickHouse and point the worker at them.
#
#   scripts/toxiproxy.sh up       install toxiproxy-server if missing, start it, wait until its API answers
#   scripts/toxiproxy.sh down     stop the server this script started
#   scripts/toxiproxy.sh status   exit 0 only if the API answers
#   scripts/toxiproxy.sh env      export line for the tests: eval "$(scripts/toxiproxy.sh env)"
#
# Installed with `go install` (module github.com/Shopify/toxiproxy/v2, pinned below) as
# $HOME/go/bin/toxiproxy-server and toxiproxy-cli. Knobs (environment):
#   SINK_TOXIPROXY_PORT (18474: API port, on 127.0.0.1)   SINK_TOXIPROXY_VERSION (v2.5.0)
# Pid file and log in ${SINK_STACK_DIR:-<repo>/.stack}/toxiproxy/.
set -euo pipefail

SCRIPT_DIR="$(cd -P "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"
REPO_ROOT="$(cd -P "$SCRIPT_DIR/.." && pwd -P)"
STACK_DIR="$(realpath -m "${SINK_STACK_DIR:-$REPO_ROOT/.stack}")"
DIR="$STACK_DIR/toxiproxy"
PID_FILE="$DIR/toxiproxy.pid"
LOG_FILE="$DIR/toxiproxy.log"
PORT="${SINK_TOXIPROXY_PORT:-18474}"
VERSION="${SINK_TOXIPROXY_VERSION:-v2.5.0}"
MODULE="github.com/Shopify/toxiproxy/v2"
GOBIN_DIR="${HOME}/go/bin"
SERVER="$GOBIN_DIR/toxiproxy-server"
CLI="$GOBIN_DIR/toxiproxy-cli"

log() { printf '[toxiproxy] %s\n' "$*" >&2; }
die() {
    printf '[toxiproxy] ERROR: %s\n' "$*" >&2
    exit 1
}

answers() { curl -fsS --max-time 3 "http://127.0.0.1:$PORT/version" >/dev/null 2>&1; }

# The pid of the server this script started, if it is still that process.
our_pid() {
    local pid
    [[ -s "$PID_FILE" ]] || return 1
    pid="$(tr -dc '0-9' <"$PID_FILE")"
    [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null || return 1
    [[ "$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null)" == *toxiproxy-server*"$PORT"* ]] || return 1
    echo "$pid"
}

go_cmd() {
    if command -v go >/dev/null 2>&1; then
        command -v go
    elif [[ -x /usr/local/go/bin/go ]]; then
        echo /usr/local/go/bin/go
    else
        return 1
    fi
}

install() {
    [[ -x "$SERVER" && -x "$CLI" ]] && return 0
    local go tmp
    if ! go="$(go_cmd)"; then
        [[ "$(id -u)" == 0 ]] || die "go not found and not root: install golang-go first"
        log "apt-get install golang-go"
        DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q golang-go >&2 || die "cannot install go"
        go="$(go_cmd)" || die "go not found after installing golang-go"
    fi
    # `go install` names the binaries after their folders (server, cli): build into a
    # folder of our own, then give them their usual names.
    tmp="$(mktemp -d)"
    log "go install $MODULE/cmd/{server,cli}@$VERSION"
    if ! GOBIN="$tmp" GOFLAGS=-buildvcs=false "$go" install \
        "$MODULE/cmd/server@$VERSION" "$MODULE/cmd/cli@$VERSION" >&2; then
        rm -rf "$tmp"
        die "go install of toxiproxy $VERSION failed"
    fi
    mkdir -p "$GOBIN_DIR"
    mv "$tmp/server" "$SERVER"
    mv "$tmp/cli" "$CLI"
    rm -rf "$tmp"
}

cmd_up() {
    local i pid
    if pid="$(our_pid)" && answers; then
        log "running (pid $pid) on 127.0.0.1:$PORT"
        return 0
    fi
    if answers; then
        log "an API answers on 127.0.0.1:$PORT already (not started by this script); using it"
        return 0
    fi
    command -v curl >/dev/null 2>&1 || die "curl not found"
    install
    mkdir -p "$DIR"
    log "starting on 127.0.0.1:$PORT"
    rm -f "$PID_FILE"
    # shellcheck disable=SC2016 # $$ and $0 are for the inner shell
    setsid bash -c 'echo $$ >"$0"; exec "$@"' "$PID_FILE" \
        "$SERVER" -host 127.0.0.1 -port "$PORT" </dev/null >>"$LOG_FILE" 2>&1 &
    for ((i = 0; i < 100; i++)); do
        answers && {
            log "ready (pid $(cat "$PID_FILE"))"
            return 0
        }
        sleep 0.1
    done
    tail -n 20 "$LOG_FILE" >&2 || true
    die "toxiproxy-server did not answer on 127.0.0.1:$PORT"
}

cmd_down() {
    local pid i
    if ! pid="$(our_pid)"; then
        log "not running"
        rm -f "$PID_FILE"
        return 0
    fi
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$PID_FILE"
    log "stopped"
}

case "${1:-}" in
    up) cmd_up ;;
    down) cmd_down ;;
    status)
        if answers; then
            echo "toxiproxy running pid=$(our_pid || echo '?') api=127.0.0.1:$PORT"
        else
            echo "toxiproxy stopped api=127.0.0.1:$PORT"
            exit 1
        fi
        ;;
    env) echo "export TOXIPROXY_URL=http://127.0.0.1:$PORT" ;;
    *)
        awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}" >&2
        exit 2
        ;;
esac
