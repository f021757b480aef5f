#!/usr/bin/env bash
# Local service stack for the sink worker, without Docker: Kafka (4.x, KRaft single node),
# Redis (Debian's redis-server) and ClickHouse (Debian's clickhouse-server 18.16); on request
# also a ClickHouse cluster (2 shards x 2 replicas) with its ZooKeeper (Debian's zookeeper).
#
#   scripts/stack.sh up     [--cluster] [--redis-sentinel] [--redis-cluster] [service ...]
#                                                          install what is missing, start, wait until answering
#   scripts/stack.sh down   [--purge] [service ...]        stop what this stack started (--purge: drop data too)
#   scripts/stack.sh status [--cluster] [service ...]      one line per service; exit 0 only if all answer
#   scripts/stack.sh env    [--cluster] [--redis-sentinel] [--redis-cluster]
#                                                          export lines: eval "$(scripts/stack.sh env)"
#   scripts/stack.sh kill   <service ...>                  SIGKILL (crash tests); `up <service>` restarts it
#   scripts/stack.sh pid    <service ...>                  the pid of each (e.g. to freeze it with SIGSTOP)
#
# Services: kafka, redis, clickhouse (the single server); the cluster's zookeeper and nodes
# clickhouse-1-1, clickhouse-1-2, clickhouse-2-1, clickhouse-2-2 (clickhouse-<shard>-<replica>);
# "cluster" names those five, "all" the first three. Without a service argument a command acts
# on the first three, with --cluster on all eight; a plain `down` stops the cluster too, and
# the Redis topologies (below) if they were started.
# So `up --cluster` starts everything, `up cluster` only the cluster. `up` of cluster services
# waits until each answers and then, if ZooKeeper and all four nodes run, until ON CLUSTER DDL
# (a database created and dropped ON CLUSTER sink_cluster) succeeds on every node.
# The cluster "sink_cluster" (remote_servers, internal_replication) has macros {cluster},
# {shard} (1, 2) and {replica} (the node's name), e.g.
# ReplicatedMergeTree('/clickhouse/tables/{shard}/t', '{replica}'). Purge it as a whole
# (`down --purge cluster`): ZooKeeper holds the nodes' replication metadata.
# `env --cluster` points CLICKHOUSE_URL at clickhouse-1-1 and adds CLICKHOUSE_CLUSTER,
# CLICKHOUSE_NODES (host:port of every node, shard-major) and ZOOKEEPER_HOSTS.
# Redis topologies for the dedup store (scripts/stack-redis.sh), each with its flag (`up`/`env`)
# and group name: --redis-sentinel / redis-sentinel (redis-ha-1..3, one master and two
# replicas, and redis-sentinel-1..3), --redis-cluster / redis-cluster (redis-cluster-1..6,
# three masters with a replica each). `env --redis-sentinel` adds REDIS_SENTINELS,
# REDIS_SENTINEL_MASTER and REDIS_SENTINEL_NODES; `env --redis-cluster` REDIS_CLUSTER_NODES.
#
# Everything (data, logs, pid files, Kafka jars) lives in ${SINK_STACK_DIR:-<repo>/.stack}, the
# cluster in its cluster/ subdir. Ports and knobs (environment):
#   SINK_KAFKA_PORT (19092)  SINK_KAFKA_CONTROLLER_PORT (19093)  SINK_REDIS_PORT (16379)
#   SINK_CLICKHOUSE_PORT (19000, native)  SINK_CLICKHOUSE_HTTP_PORT (18123)
#   SINK_ZOOKEEPER_PORT (12181)  cluster node k = 1..4 (1-1, 1-2, 2-1, 2-2) listens on
#   SINK_CLUSTER_TCP_PORT_BASE+k (19100: native 19101..19104),
#   SINK_CLUSTER_HTTP_PORT_BASE+k (18200: http 18201..18204),
#   SINK_CLUSTER_INTERSERVER_PORT_BASE+k (19200: replication 19201..19204)
#   SINK_REDIS_HA_PORT_BASE+k (17200: redis-ha-k), SINK_REDIS_SENTINEL_PORT_BASE+k (17300:
#   redis-sentinel-k), SINK_REDIS_CLUSTER_PORT_BASE+k (17100: redis-cluster-k, bus port +10000)
#   SINK_STACK_TIMEOUT (120: seconds each service gets to answer)
#   SINK_KAFKA_HEAP_OPTS ("-Xmx512m -Xms256m")  SINK_ZOOKEEPER_HEAP_OPTS ("-Xmx128m -Xms16m")
# `up` prints the env lines on stdout followed by a summary as '#' comments, so
# eval "$(scripts/stack.sh up)" works too; progress messages go to stderr.
set -euo pipefail

SCRIPT_DIR="$(cd -P "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"
REPO_ROOT="$(cd -P "$SCRIPT_DIR/.." && pwd -P)"

# Absolute and free of symlinks (pid checks compare it with /proc/<pid>/ paths).
STACK_DIR="$(realpath -m "${SINK_STACK_DIR:-$REPO_ROOT/.stack}")"

KAFKA_PORT="${SINK_KAFKA_PORT:-19092}"
KAFKA_CONTROLLER_PORT="${SINK_KAFKA_CONTROLLER_PORT:-19093}"
REDIS_PORT="${SINK_REDIS_PORT:-16379}"
CH_TCP_PORT="${SINK_CLICKHOUSE_PORT:-19000}"
CH_HTTP_PORT="${SINK_CLICKHOUSE_HTTP_PORT:-18123}"
WAIT_TIMEOUT="${SINK_STACK_TIMEOUT:-120}"
KAFKA_HEAP_OPTS="${SINK_KAFKA_HEAP_OPTS:--Xmx512m -Xms256m}"
STOP_TIMEOUT=20
ALL_SERVICES=(kafka redis clickhouse)

# Kafka: the broker's own JVM options (no TieredStopAtLevel: broker throughput matters).
KAFKA_JVM_OPTS=(-server -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -XX:InitiatingHeapOccupancyPercent=35
    -XX:+ExplicitGCInvokesConcurrent -XX:ParallelGCThreads=2 -XX:ConcGCThreads=1
    -XX:+ExitOnOutOfMemoryError -Djava.awt.headless=true)
# Short-lived helper JVMs (storage format, probe): small and quick to start.
TOOL_JVM_OPTS=(-Xmx128m -XX:+UseSerialGC -XX:TieredStopAtLevel=1 -Djava.awt.headless=true)

KAFKA_SRC="$SCRIPT_DIR/kafka"
KAFKA_POM="$KAFKA_SRC/pom.xml"
KAFKA_DIR="$STACK_DIR/kafka"
KAFKA_LIBS="$KAFKA_DIR/libs"
KAFKA_PROBE_CLASSES="$KAFKA_DIR/probe-classes"
KAFKA_DATA="$KAFKA_DIR/data"
KAFKA_LOGS="$KAFKA_DIR/logs"
KAFKA_CONF="$KAFKA_DIR/server.properties"
KAFKA_PID="$KAFKA_DIR/kafka.pid"
KAFKA_LOG="$KAFKA_LOGS/server.log"
KAFKA_STDOUT="$KAFKA_LOGS/stdout.log"
KAFKA_PROBE_TOPIC="sink-stack-probe"

REDIS_DIR="$STACK_DIR/redis"
REDIS_PID="$REDIS_DIR/redis.pid"
REDIS_LOG="$REDIS_DIR/redis.log"

CH_SRC="$SCRIPT_DIR/clickhouse"
CH_DIR="$STACK_DIR/clickhouse"
CH_CONF="$CH_DIR/config.xml"
CH_PID="$CH_DIR/clickhouse.pid"
CH_LOG="$CH_DIR/logs/clickhouse-server.log"
CH_ERRLOG="$CH_DIR/logs/clickhouse-server.err.log"
CH_STDOUT="$CH_DIR/logs/stdout.log"

# The replicated+sharded ClickHouse cluster and its ZooKeeper (cluster_* hooks, CLUSTER_* names).
# shellcheck source=scripts/stack-cluster.sh
source "$SCRIPT_DIR/stack-cluster.sh"
# The Redis Sentinel and Redis Cluster topologies (redis_topo_* hooks, REDIS_* names).
# shellcheck source=scripts/stack-redis.sh
source "$SCRIPT_DIR/stack-redis.sh"

# A service of an optional topology: the ClickHouse cluster's or a Redis topology's.
optional_service() { cluster_service_ok "$1" || redis_topo_service_ok "$1"; }

# Hook $1 of the optional topology that service $2 belongs to, with the remaining arguments.
hook() {
    local name="$1"
    shift
    if redis_topo_service_ok "$1"; then "redis_topo_$name" "$@"; else "cluster_$name" "$@"; fi
}

# ---------------------------------------------------------------------------------------------
# small helpers

log() { printf '[stack] %s\n' "$*" >&2; }
warn() { printf '[stack] WARNING: %s\n' "$*" >&2; }
die() {
    printf '[stack] ERROR: %s\n' "$*" >&2
    exit 1
}

usage() {
    # The comment block at the top of this file.
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}" >&2
}

now() { date +%s; }

# Print the last lines of a log file (to stderr) with a header naming it.
show_log() {
    local file="$1" lines="${2:-30}"
    if [[ -s "$file" ]]; then
        printf '[stack] ---- last %s lines of %s ----\n' "$lines" "$file" >&2
        tail -n "$lines" "$file" >&2 || true
        printf '[stack] ---- end of %s ----\n' "$file" >&2
    else
        printf '[stack] (log %s is empty or missing)\n' "$file" >&2
    fi
}

# True if something accepts TCP connections on 127.0.0.1:$1.
port_open() {
    # shellcheck disable=SC2016 # $1 is the inner shell's
    timeout 2 bash -c 'exec 3<>"/dev/tcp/127.0.0.1/$1"' _ "$1" 2>/dev/null
}

hash_of() { cat "$@" | sha256sum | cut -d' ' -f1; }

clickhouse_server_bin() {
    if command -v clickhouse-server >/dev/null 2>&1; then
        command -v clickhouse-server
    elif [[ -x /usr/sbin/clickhouse-server ]]; then
        echo /usr/sbin/clickhouse-server
    else
        return 1
    fi
}

# Prints the command (one word per line) that runs the ClickHouse client.
clickhouse_client_cmd() {
    if command -v clickhouse-client >/dev/null 2>&1; then
        command -v clickhouse-client
    elif command -v clickhouse >/dev/null 2>&1; then
        command -v clickhouse
        echo client
    else
        return 1
    fi
}

redis_server_bin() {
    if command -v redis-server >/dev/null 2>&1; then
        command -v redis-server
    elif [[ -x /usr/bin/redis-server ]]; then
        echo /usr/bin/redis-server
    else
        return 1
    fi
}

service_ok() {
    case "$1" in
        kafka | redis | clickhouse) return 0 ;;
        *) optional_service "$1" ;;
    esac
}

pid_file_of() {
    case "$1" in
        kafka) echo "$KAFKA_PID" ;;
        redis) echo "$REDIS_PID" ;;
        clickhouse) echo "$CH_PID" ;;
        *) hook pid_file_of "$1" ;;
    esac
}

port_of() {
    case "$1" in
        kafka) echo "$KAFKA_PORT" ;;
        redis) echo "$REDIS_PORT" ;;
        clickhouse) echo "$CH_TCP_PORT" ;;
        *) hook port_of "$1" ;;
    esac
}

main_log_of() {
    case "$1" in
        kafka) echo "$KAFKA_LOG" ;;
        redis) echo "$REDIS_LOG" ;;
        clickhouse) echo "$CH_LOG" ;;
        *) hook main_log_of "$1" ;;
    esac
}

# Prints the pid of the service if this stack's process is alive (pid file present, process
# alive and really ours: its command line names this stack's files). Returns 1 otherwise.
service_pid() {
    local svc="$1" pidfile pid cmdline
    pidfile="$(pid_file_of "$svc")"
    [[ -s "$pidfile" ]] || return 1
    pid="$(tr -dc '0-9' <"$pidfile")"
    [[ -n "$pid" ]] || return 1
    kill -0 "$pid" 2>/dev/null || return 1
    # A zombie or a recycled pid has another (or an empty) command line.
    cmdline="$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null)" || return 1
    case "$svc" in
        kafka) [[ "$cmdline" == *kafka.Kafka*"$KAFKA_CONF"* ]] || return 1 ;;
        redis)
            # redis rewrites its process title; it is started in $REDIS_DIR and then moves to
            # its data dir, so its working directory tells ours from any other redis.
            [[ "$cmdline" == *redis-server* ]] || return 1
            case "$(readlink "/proc/$pid/cwd" 2>/dev/null)" in
                "$REDIS_DIR" | "$REDIS_DIR/data") ;;
                *) return 1 ;;
            esac
            ;;
        clickhouse) [[ "$cmdline" == *"$CH_CONF"* ]] || return 1 ;;
        *) hook owns "$svc" "$cmdline" || return 1 ;;
    esac
    echo "$pid"
}

# True once pid $1 has really exited (gone, or a zombie whose sockets are closed).
pid_gone() {
    local state
    kill -0 "$1" 2>/dev/null || return 0
    state="$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1)" || return 0
    [[ -z "$state" || "$state" == Z || "$state" == X ]]
}

# Wait up to $2 seconds for pid $1 to exit. Returns 1 if it is still there.
wait_pid_gone() {
    local pid="$1" i
    for ((i = 0; i < $2 * 10; i++)); do
        pid_gone "$pid" && return 0
        sleep 0.1
    done
    pid_gone "$pid"
}

# Run "$@" detached (own session, stdin /dev/null, output appended to $2), writing its pid to $1.
# The lock fd (9) is closed so that a long-running service never holds the stack lock.
launch() {
    local pidfile="$1" out="$2"
    shift 2
    rm -f "$pidfile"
    # shellcheck disable=SC2016 # $$ and $0 are for the inner shell
    setsid bash -c 'echo $$ >"$0"; exec "$@"' "$pidfile" "$@" </dev/null >>"$out" 2>&1 9>&- &
    local i
    for ((i = 0; i < 50; i++)); do
        [[ -s "$pidfile" ]] && return 0
        sleep 0.1
    done
    die "could not launch: $*"
}

# Take the stack lock (serialises up/down/kill of concurrent callers).
take_lock() {
    mkdir -p "$STACK_DIR"
    exec 9>"$STACK_DIR/.lock"
    if ! flock -w 600 9; then
        die "another stack.sh is still running (lock $STACK_DIR/.lock)"
    fi
}

# ---------------------------------------------------------------------------------------------
# installation

APT_UPDATED=0
apt_install() {
    [[ $# -gt 0 ]] || return 0
    if [[ "$(id -u)" != 0 ]]; then
        die "missing packages ($*) and not root: install them with apt-get first"
    fi
    export DEBIAN_FRONTEND=noninteractive
    if [[ "$APT_UPDATED" == 0 ]]; then
        log "apt-get update"
        apt-get update -qq >&2 || die "apt-get update failed"
        APT_UPDATED=1
    fi
    log "apt-get install -y $*"
    apt-get install -y -q "$@" >&2 || die "apt-get install $* failed"
}

# Install the Debian packages the given services need, if their programs are missing.
ensure_packages() {
    local pkgs=() svc
    command -v curl >/dev/null 2>&1 || pkgs+=(curl)
    command -v flock >/dev/null 2>&1 || pkgs+=(util-linux)
    for svc in "$@"; do
        case "$svc" in
            redis)
                redis_server_bin >/dev/null || pkgs+=(redis-server)
                command -v redis-cli >/dev/null 2>&1 || pkgs+=(redis-tools)
                ;;
            clickhouse)
                clickhouse_server_bin >/dev/null || pkgs+=(clickhouse-server)
                clickhouse_client_cmd >/dev/null || pkgs+=(clickhouse-client)
                ;;
            kafka)
                if ! command -v java >/dev/null 2>&1 || ! command -v javac >/dev/null 2>&1; then
                    pkgs+=(openjdk-17-jdk-headless)
                fi
                if ! command -v mvn >/dev/null 2>&1 && ! kafka_libs_current; then
                    pkgs+=(maven)
                fi
                ;;
            *) hook packages "$svc" ;;
        esac
    done
    if [[ ${#pkgs[@]} -gt 0 ]]; then
        # de-duplicate
        mapfile -t pkgs < <(printf '%s\n' "${pkgs[@]}" | sort -u)
        apt_install "${pkgs[@]}"
    fi
}

# ---------------------------------------------------------------------------------------------
# Kafka

kafka_libs_current() {
    [[ -f "$KAFKA_DIR/libs.stamp" ]] &&
        [[ "$(cat "$KAFKA_DIR/libs.stamp")" == "$(hash_of "$KAFKA_POM")" ]] &&
        compgen -G "$KAFKA_LIBS/kafka_2.13-*.jar" >/dev/null
}

# Copy the broker's jars (from ~/.m2, downloading into it the first time) unless they are
# already there for this very pom.
kafka_ensure_libs() {
    if kafka_libs_current; then
        return 0
    fi
    command -v mvn >/dev/null 2>&1 || die "mvn not found (apt-get install maven)"
    log "kafka: resolving jars with maven into $KAFKA_LIBS"
    mkdir -p "$KAFKA_DIR"
    rm -rf "$KAFKA_LIBS.tmp" "$KAFKA_DIR/libs.stamp"
    # Output goes to a file: Debian's maven prints stray ANSI resets even with -B -q.
    if ! (cd "$KAFKA_DIR" && mvn -B -q -Dstyle.color=never -f "$KAFKA_POM" \
        dependency:copy-dependencies -DoutputDirectory="$KAFKA_LIBS.tmp" >"$KAFKA_DIR/mvn.log" 2>&1 9>&-); then
        show_log "$KAFKA_DIR/mvn.log" 40
        die "kafka: maven could not resolve the jars of $KAFKA_POM (log: $KAFKA_DIR/mvn.log)"
    fi
    rm -rf "$KAFKA_LIBS"
    mv "$KAFKA_LIBS.tmp" "$KAFKA_LIBS"
    hash_of "$KAFKA_POM" >"$KAFKA_DIR/libs.stamp"
}

# Compile the readiness probe (scripts/kafka/StackProbe.java) once per source/pom version.
kafka_ensure_probe() {
    local want
    want="$(hash_of "$KAFKA_SRC/StackProbe.java" "$KAFKA_POM")"
    if [[ -f "$KAFKA_PROBE_CLASSES/StackProbe.class" && -f "$KAFKA_PROBE_CLASSES/.stamp" ]] &&
        [[ "$(cat "$KAFKA_PROBE_CLASSES/.stamp")" == "$want" ]]; then
        return 0
    fi
    command -v javac >/dev/null 2>&1 || die "javac not found (apt-get install openjdk-17-jdk-headless)"
    log "kafka: compiling the readiness probe"
    rm -rf "$KAFKA_PROBE_CLASSES"
    mkdir -p "$KAFKA_PROBE_CLASSES"
    javac -J-Xmx256m -nowarn -d "$KAFKA_PROBE_CLASSES" -cp "$KAFKA_LIBS/*" \
        "$KAFKA_SRC/StackProbe.java" >&2 9>&- || die "kafka: could not compile StackProbe.java"
    echo "$want" >"$KAFKA_PROBE_CLASSES/.stamp"
}

kafka_write_config() {
    mkdir -p "$KAFKA_DATA" "$KAFKA_LOGS"
    sed -e "s#@KAFKA_PORT@#$KAFKA_PORT#g" \
        -e "s#@KAFKA_CONTROLLER_PORT@#$KAFKA_CONTROLLER_PORT#g" \
        -e "s#@KAFKA_DATA_DIR@#$KAFKA_DATA#g" \
        "$KAFKA_SRC/server.properties.in" >"$KAFKA_CONF.tmp"
    mv "$KAFKA_CONF.tmp" "$KAFKA_CONF"
}

# A random KRaft cluster id: 16 random bytes, URL-safe base64 without padding (what
# `kafka-storage random-uuid` prints); one that starts with '-' would look like an option.
kafka_cluster_id() {
    local id
    while :; do
        id="$(head -c 16 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=\n')"
        [[ "$id" != -* && ${#id} == 22 ]] && break
    done
    echo "$id"
}

kafka_format() {
    if [[ -f "$KAFKA_DATA/meta.properties" ]]; then
        return 0
    fi
    local id
    id="$(kafka_cluster_id)"
    log "kafka: formatting storage in $KAFKA_DATA (cluster id $id)"
    if ! java "${TOOL_JVM_OPTS[@]}" -Dlog4j2.configurationFile="$KAFKA_SRC/log4j2-tools.properties" \
        -cp "$KAFKA_LIBS/*" kafka.tools.StorageTool format --ignore-formatted \
        --cluster-id "$id" --config "$KAFKA_CONF" >"$KAFKA_LOGS/format.log" 2>&1 9>&-; then
        show_log "$KAFKA_LOGS/format.log"
        die "kafka: storage format failed"
    fi
    echo "$id" >"$KAFKA_DIR/cluster.id"
}

kafka_start() {
    kafka_ensure_libs
    kafka_ensure_probe
    kafka_write_config
    kafka_format
    log "kafka: starting on 127.0.0.1:$KAFKA_PORT (controller $KAFKA_CONTROLLER_PORT)"
    # shellcheck disable=SC2206 # the heap options are meant to split into words
    local heap=($KAFKA_HEAP_OPTS)
    (cd "$KAFKA_DIR" && launch "$KAFKA_PID" "$KAFKA_STDOUT" \
        java "${heap[@]}" "${KAFKA_JVM_OPTS[@]}" \
        -Dkafka.logs.dir="$KAFKA_LOGS" \
        -Dlog4j2.configurationFile="$KAFKA_SRC/log4j2.properties" \
        -cp "$KAFKA_LIBS/*" kafka.Kafka "$KAFKA_CONF")
}

# Real round trip (create probe topic, produce, consume via a group) within $1 seconds.
# While it runs, the broker process must stay alive. Output of the probe: $KAFKA_DIR/probe.out.
kafka_probe() {
    local timeout="$1" out="$KAFKA_DIR/probe.out" probe rc=0
    [[ -f "$KAFKA_PROBE_CLASSES/StackProbe.class" ]] || {
        echo "probe not compiled" >"$out"
        return 1
    }
    java "${TOOL_JVM_OPTS[@]}" -Dlog4j2.configurationFile="$KAFKA_SRC/log4j2-tools.properties" \
        -cp "$KAFKA_LIBS/*:$KAFKA_PROBE_CLASSES" StackProbe \
        "127.0.0.1:$KAFKA_PORT" "$KAFKA_PROBE_TOPIC" "$timeout" >"$out" 2>&1 9>&- &
    probe=$!
    while kill -0 "$probe" 2>/dev/null; do
        if ! service_pid kafka >/dev/null; then
            kill "$probe" 2>/dev/null || true
            wait "$probe" 2>/dev/null || true
            echo "kafka process exited while probing" >>"$out"
            return 1
        fi
        sleep 0.3
    done
    wait "$probe" || rc=$?
    return "$rc"
}

# ---------------------------------------------------------------------------------------------
# Redis

redis_start() {
    local bin
    bin="$(redis_server_bin)" || die "redis-server not found"
    mkdir -p "$REDIS_DIR/data"
    log "redis: starting on 127.0.0.1:$REDIS_PORT"
    # Not --daemonize: launch() detaches it and records the pid before it returns.
    # AOF, as production should run it: dedup markers survive a restart (a crash loses at
    # most the last second).
    (cd "$REDIS_DIR" && launch "$REDIS_PID" "$REDIS_DIR/stdout.log" \
        "$bin" --bind 127.0.0.1 --port "$REDIS_PORT" --protected-mode yes --daemonize no \
        --logfile "$REDIS_LOG" --dir "$REDIS_DIR/data" --save '' --appendonly yes \
        --appendfsync everysec --databases 16)
}

redis_answers() {
    [[ "$(timeout 5 redis-cli -h 127.0.0.1 -p "$REDIS_PORT" PING 2>/dev/null)" == PONG ]]
}

# ---------------------------------------------------------------------------------------------
# ClickHouse

clickhouse_write_config() {
    mkdir -p "$CH_DIR/logs" "$CH_DIR/data"
    sed -e "s#@CH_DIR@#$CH_DIR#g" -e "s#@CH_HTTP_PORT@#$CH_HTTP_PORT#g" \
        -e "s#@CH_TCP_PORT@#$CH_TCP_PORT#g" "$CH_SRC/config.xml.in" >"$CH_CONF.tmp"
    mv "$CH_CONF.tmp" "$CH_CONF"
    sed -e "s#@CH_DIR@#$CH_DIR#g" "$CH_SRC/users.xml.in" >"$CH_DIR/users.xml.tmp"
    mv "$CH_DIR/users.xml.tmp" "$CH_DIR/users.xml"
}

clickhouse_start() {
    local bin
    bin="$(clickhouse_server_bin)" || die "clickhouse-server not found"
    clickhouse_write_config
    log "clickhouse: starting on 127.0.0.1:$CH_TCP_PORT (native), 127.0.0.1:$CH_HTTP_PORT (http)"
    (cd "$CH_DIR" && launch "$CH_PID" "$CH_STDOUT" "$bin" --config-file="$CH_CONF")
}

# Both ports answer SELECT 1 ($1: http port, $2: native port; the single server's by default).
clickhouse_answers() {
    local out client http_port="${1:-$CH_HTTP_PORT}" tcp_port="${2:-$CH_TCP_PORT}"
    out="$(curl -fsS --max-time 5 "http://127.0.0.1:$http_port/?query=SELECT%201" 2>/dev/null)" || return 1
    [[ "$out" == 1 ]] || return 1
    mapfile -t client < <(clickhouse_client_cmd) || return 0
    [[ ${#client[@]} -gt 0 ]] || return 0
    out="$(timeout 10 "${client[@]}" --host 127.0.0.1 --port "$tcp_port" --user default \
        --query 'SELECT 1' 2>/dev/null)" || return 1
    [[ "$out" == 1 ]]
}

# ---------------------------------------------------------------------------------------------
# generic service operations

start_service() {
    local svc="$1" pid port ports i
    if pid="$(service_pid "$svc")"; then
        log "$svc: already running (pid $pid), leaving it alone"
        # (the probe may be newer than the running broker)
        [[ "$svc" != kafka ]] || kafka_ensure_probe
        return 0
    fi
    ports=("$(port_of "$svc")")
    [[ "$svc" == kafka ]] && ports+=("$KAFKA_CONTROLLER_PORT")
    [[ "$svc" == clickhouse ]] && ports+=("$CH_HTTP_PORT")
    optional_service "$svc" && mapfile -t ports < <(hook ports_of "$svc")
    for port in "${ports[@]}"; do
        # A process of ours that was just killed may still be releasing its sockets: give it 10 s.
        for ((i = 0; i < 20; i++)); do
            port_open "$port" || break
            sleep 0.5
        done
        if port_open "$port"; then
            die "$svc: port 127.0.0.1:$port is taken by a process this stack did not start:" \
                "$(ss -Hltnp "sport = :$port" 2>/dev/null | head -n1 || true)"
        fi
    done
    if optional_service "$svc"; then
        hook start "$svc"
    else
        "${svc}_start"
    fi
}

fail_service() {
    local svc="$1" why="$2"
    printf '[stack] ERROR: %s %s\n' "$svc" "$why" >&2
    case "$svc" in
        kafka)
            show_log "$KAFKA_LOG"
            [[ -s "$KAFKA_STDOUT" ]] && show_log "$KAFKA_STDOUT" 15
            [[ -s "$KAFKA_DIR/probe.out" ]] && show_log "$KAFKA_DIR/probe.out" 15
            ;;
        redis)
            show_log "$REDIS_LOG"
            [[ -s "$REDIS_DIR/stdout.log" ]] && show_log "$REDIS_DIR/stdout.log" 15
            ;;
        clickhouse)
            show_log "$CH_LOG"
            [[ -s "$CH_ERRLOG" ]] && show_log "$CH_ERRLOG" 15
            [[ -s "$CH_STDOUT" ]] && show_log "$CH_STDOUT" 15
            ;;
        *) hook fail_logs "$svc" ;;
    esac
    printf '[stack] %s log: %s\n' "$svc" "$(main_log_of "$svc")" >&2
    return 1
}

# Wait until the service answers a real request, at most $WAIT_TIMEOUT seconds.
wait_service() {
    local svc="$1" start deadline left
    start="$(now)"
    deadline=$((start + WAIT_TIMEOUT))
    log "$svc: waiting until it answers (at most ${WAIT_TIMEOUT}s)"
    while :; do
        if ! service_pid "$svc" >/dev/null; then
            fail_service "$svc" "process is not running (it exited during startup)"
            return 1
        fi
        case "$svc" in
            redis) redis_answers && break ;;
            clickhouse) clickhouse_answers && break ;;
            zookeeper | clickhouse-* | redis-*) hook answers "$svc" && break ;;
            kafka)
                # The probe retries by itself until its deadline, so it is started right away:
                # its JVM start overlaps the broker's (the broker opens its port last).
                left=$((deadline - $(now)))
                ((left < 5)) && left=5
                if kafka_probe "$left"; then
                    break
                fi
                if ! service_pid kafka >/dev/null; then
                    fail_service kafka "process exited while starting up"
                    return 1
                fi
                fail_service kafka "did not complete a produce/consume round trip within ${WAIT_TIMEOUT}s"
                return 1
                ;;
        esac
        if (($(now) >= deadline)); then
            fail_service "$svc" "did not answer within ${WAIT_TIMEOUT}s"
            return 1
        fi
        sleep 0.3
    done
    SUMMARY_LINES+=("$svc: running, pid $(service_pid "$svc"), $(describe_endpoint "$svc"), answered after $(($(now) - start))s")
    log "$svc: ready"
}

describe_endpoint() {
    case "$1" in
        kafka) echo "127.0.0.1:$KAFKA_PORT (controller :$KAFKA_CONTROLLER_PORT), log $KAFKA_LOG" ;;
        redis) echo "127.0.0.1:$REDIS_PORT, log $REDIS_LOG" ;;
        clickhouse) echo "127.0.0.1:$CH_TCP_PORT native / :$CH_HTTP_PORT http, log $CH_LOG" ;;
        *) hook describe "$1" ;;
    esac
}

# TERM, up to $STOP_TIMEOUT s grace, then KILL. Removes the pid file.
stop_service() {
    local svc="$1" pid pidfile
    pidfile="$(pid_file_of "$svc")"
    if ! pid="$(service_pid "$svc")"; then
        log "$svc: not running"
        rm -f "$pidfile"
        return 0
    fi
    log "$svc: stopping pid $pid"
    kill -TERM "$pid" 2>/dev/null || true
    # A test may have frozen it (SIGSTOP): it only acts on the TERM once it runs again.
    kill -CONT "$pid" 2>/dev/null || true
    if ! wait_pid_gone "$pid" "$STOP_TIMEOUT"; then
        warn "$svc: still running after ${STOP_TIMEOUT}s, sending KILL"
        kill -KILL "$pid" 2>/dev/null || true
        wait_pid_gone "$pid" 10 || die "$svc: pid $pid does not die"
    fi
    rm -f "$pidfile"
    log "$svc: stopped"
}

kill_service() {
    local svc="$1" pid
    if ! pid="$(service_pid "$svc")"; then
        log "$svc: not running"
        return 0
    fi
    log "$svc: SIGKILL to pid $pid"
    kill -KILL "$pid" 2>/dev/null || true
    wait_pid_gone "$pid" 10 || warn "$svc: pid $pid still there 10s after SIGKILL"
    # The pid file stays, as after a real crash; `up` notices the process is gone.
}

purge_service() {
    case "$1" in
        kafka)
            log "kafka: removing data and logs"
            rm -rf "$KAFKA_DATA" "$KAFKA_LOGS" "$KAFKA_CONF" "$KAFKA_DIR/cluster.id" "$KAFKA_DIR/probe.out"
            ;;
        redis)
            log "redis: removing data and logs"
            rm -rf "$REDIS_DIR"
            ;;
        clickhouse)
            log "clickhouse: removing data and logs"
            rm -rf "$CH_DIR"
            ;;
        *) hook purge "$1" ;;
    esac
}

# One status line; returns 0 if the service answers.
status_service() {
    local svc="$1" pid state answers=no rc=1
    if pid="$(service_pid "$svc")"; then
        state="running"
        case "$svc" in
            redis) redis_answers && answers=yes ;;
            clickhouse) clickhouse_answers && answers=yes ;;
            kafka) port_open "$KAFKA_PORT" && kafka_probe 20 >/dev/null 2>&1 && answers=yes ;;
            *) hook answers "$svc" && answers=yes ;;
        esac
    else
        state="stopped"
        pid="-"
        [[ -s "$(pid_file_of "$svc")" ]] && state="stopped(stale-pid-file)"
    fi
    [[ "$answers" == yes ]] && rc=0
    printf '%-14s %-24s pid=%-8s port=%-6s answers=%s\n' "$svc" "$state" "$pid" "$(port_of "$svc")" "$answers"
    return "$rc"
}

# With --cluster: CLICKHOUSE_URL names the cluster's first node, and the cluster's variables follow.
print_env() {
    echo "export KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:$KAFKA_PORT"
    echo "export REDIS_URL=redis://127.0.0.1:$REDIS_PORT/0"
    if [[ "$WITH_CLUSTER" == 1 ]]; then
        cluster_print_env
    else
        echo "export CLICKHOUSE_URL=clickhouse://default:@127.0.0.1:$CH_TCP_PORT/default"
    fi
    [[ "$WITH_REDIS_SENTINEL" == 0 ]] || redis_topo_print_env sentinel
    [[ "$WITH_REDIS_CLUSTER" == 0 ]] || redis_topo_print_env cluster
}

# ---------------------------------------------------------------------------------------------
# commands

SUMMARY_LINES=()
WITH_CLUSTER=0
WITH_REDIS_SENTINEL=0
WITH_REDIS_CLUSTER=0

cmd_up() {
    local svc failed=0 t0
    t0="$(now)"
    take_lock
    ensure_packages "$@"
    # Quick starters first: they come up while Kafka's jars, probe and storage are prepared.
    for svc in redis clickhouse; do
        [[ " $* " == *" $svc "* ]] && start_service "$svc"
    done
    cluster_up_start "$@" || failed=1
    redis_topo_up_start "$@" || failed=1
    [[ " $* " == *" kafka "* ]] && start_service kafka
    for svc in redis clickhouse kafka; do
        if [[ " $* " == *" $svc "* ]]; then
            wait_service "$svc" || failed=1
        fi
    done
    ((failed)) || cluster_up_wait "$@" || failed=1
    ((failed)) || redis_topo_up_wait "$@" || failed=1
    if ((failed)); then
        die "stack is not up (see above); \`$0 down\` stops what did start"
    fi
    print_env
    for svc in "${SUMMARY_LINES[@]}"; do
        echo "# $svc"
    done
    echo "# up in $(($(now) - t0))s; stack dir $STACK_DIR"
}

cmd_down() {
    local purge="$1" svc
    shift
    [[ -d "$STACK_DIR" ]] || {
        log "nothing to stop ($STACK_DIR does not exist)"
        return 0
    }
    take_lock
    # ZooKeeper last: the cluster nodes shut down while it still answers.
    for svc in "$@"; do
        [[ "$svc" == zookeeper ]] && continue
        stop_service "$svc"
        if [[ "$purge" == 1 ]]; then
            purge_service "$svc"
        fi
    done
    if [[ " $* " == *" zookeeper "* ]]; then
        stop_service zookeeper
        [[ "$purge" == 1 ]] && purge_service zookeeper
    fi
    return 0
}

cmd_status() {
    local svc rc=0
    for svc in "$@"; do
        status_service "$svc" || rc=1
    done
    return "$rc"
}

cmd_kill() {
    local svc
    [[ -d "$STACK_DIR" ]] || return 0
    take_lock
    for svc in "$@"; do
        kill_service "$svc"
    done
}

# The pid of each service, one a line (for tests that freeze one with SIGSTOP); fails if one
# does not run.
cmd_pid() {
    local svc pid rc=0
    for svc in "$@"; do
        if pid="$(service_pid "$svc")"; then
            echo "$pid"
        else
            printf '[stack] %s: not running\n' "$svc" >&2
            rc=1
        fi
    done
    return "$rc"
}

main() {
    local cmd="${1:-}" purge=0 services=() arg
    [[ $# -gt 0 ]] && shift
    for arg in "$@"; do
        case "$arg" in
            --purge) purge=1 ;;
            --cluster) WITH_CLUSTER=1 ;;
            --redis-sentinel) WITH_REDIS_SENTINEL=1 ;;
            --redis-cluster) WITH_REDIS_CLUSTER=1 ;;
            all) services+=("${ALL_SERVICES[@]}") ;;
            cluster) services+=("${CLUSTER_SERVICES[@]}") ;;
            redis-sentinel) services+=("${REDIS_SENTINEL_SERVICES[@]}") ;;
            redis-cluster) services+=("${REDIS_CLUSTER_SERVICES[@]}") ;;
            -h | --help)
                usage
                exit 0
                ;;
            *)
                service_ok "$arg" ||
                    die "unknown service '$arg' (kafka, redis, clickhouse, cluster, zookeeper, ${CLUSTER_NODES[*]}," \
                        "redis-sentinel, redis-cluster, redis-ha-<1..3>, redis-sentinel-<1..3>, redis-cluster-<1..6>)"
                services+=("$arg")
                ;;
        esac
    done
    if [[ "$purge" == 1 && "$cmd" != down ]]; then
        die "--purge only goes with down"
    fi
    if [[ ${#services[@]} -eq 0 ]]; then
        [[ "$cmd" == kill || "$cmd" == pid ]] &&
            die "$cmd needs a service: kafka, redis, clickhouse, zookeeper or clickhouse-<shard>-<replica>"
        services=("${ALL_SERVICES[@]}")
        if [[ "$WITH_CLUSTER" == 1 ]]; then
            services+=("${CLUSTER_SERVICES[@]}")
        elif [[ "$cmd" == down && -d "$CLUSTER_DIR" ]]; then
            # A plain `down` stops the cluster too if it was ever started here.
            services+=("${CLUSTER_SERVICES[@]}")
        fi
        [[ "$WITH_REDIS_SENTINEL" == 0 ]] || services+=("${REDIS_SENTINEL_SERVICES[@]}")
        [[ "$WITH_REDIS_CLUSTER" == 0 ]] || services+=("${REDIS_CLUSTER_SERVICES[@]}")
        # A plain `down` stops the Redis topologies too if they were ever started here.
        if [[ "$cmd" == down && "$WITH_REDIS_SENTINEL" == 0 && -d "$REDIS_SENTINEL_DIR" ]]; then
            services+=("${REDIS_SENTINEL_SERVICES[@]}")
        fi
        if [[ "$cmd" == down && "$WITH_REDIS_CLUSTER" == 0 && -d "$REDIS_CLUSTER_DIR" ]]; then
            services+=("${REDIS_CLUSTER_SERVICES[@]}")
        fi
    else
        # each service once, in the order given
        mapfile -t services < <(printf '%s\n' "${services[@]}" | awk '!seen[$0]++')
    fi
    # `up` of a cluster service prints the cluster's variables.
    [[ "$cmd" == up ]] && cluster_named "${services[@]}" && WITH_CLUSTER=1
    # ... and of a Redis topology's service, that topology's.
    [[ "$cmd" == up ]] && redis_topo_named sentinel "${services[@]}" && WITH_REDIS_SENTINEL=1
    [[ "$cmd" == up ]] && redis_topo_named cluster "${services[@]}" && WITH_REDIS_CLUSTER=1
    case "$cmd" in
        up) cmd_up "${services[@]}" ;;
        down) cmd_down "$purge" "${services[@]}" ;;
        status) cmd_status "${services[@]}" ;;
        env) print_env ;;
        kill) cmd_kill "${services[@]}" ;;
        pid) cmd_pid "${services[@]}" ;;
        -h | --help | help)
            usage
            ;;
        *)
            usage
            exit 2
            ;;
    esac
}

main "$@"
