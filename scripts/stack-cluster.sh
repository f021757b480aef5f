# shellcheck shell=bash
# The local ClickHouse cluster of scripts/stack.sh, which sources this file (it is not run on its
# own): ZooKeeper (Debian's zookeeper package, standalone) and four clickhouse-server 18.16
# processes, 2 shards x 2 replicas, cluster "sink_cluster", everything on 127.0.0.1.
#
# Services: zookeeper and the nodes clickhouse-<shard>-<replica> (clickhouse-1-1, clickhouse-1-2,
# clickhouse-2-1, clickhouse-2-2); the name "cluster" stands for all five. stack.sh's generic
# functions (service_pid, start_service, wait_service, stop_service, ...) handle them like the
# other services through the cluster_* hooks at the end of this file.
#
# Layout under <stack>/cluster/:
#   zookeeper/      zoo.cfg (from clickhouse/cluster/zoo.cfg.in), data/, logs/, zookeeper.pid
#   <node>/         config.xml and users.xml made from the single server's templates
#                   (clickhouse/config.xml.in, users.xml.in: same settings, users and profiles,
#                   the node's own dir and ports), plus config.d/cluster.xml and users.d/cluster.xml
#                   (clickhouse/cluster/*.xml.in: zookeeper, remote_servers, macros, distributed
#                   DDL, small pools), which clickhouse-server merges into them; data/, logs/,
#                   clickhouse.pid

CLUSTER_NAME=sink_cluster
ZK_PORT="${SINK_ZOOKEEPER_PORT:-12181}"
# Node k (1..4, shard-major: 1-1, 1-2, 2-1, 2-2) listens on base+k.
CLUSTER_TCP_PORT_BASE="${SINK_CLUSTER_TCP_PORT_BASE:-19100}"
CLUSTER_HTTP_PORT_BASE="${SINK_CLUSTER_HTTP_PORT_BASE:-18200}"
CLUSTER_INTERSERVER_PORT_BASE="${SINK_CLUSTER_INTERSERVER_PORT_BASE:-19200}"
ZK_HEAP_OPTS="${SINK_ZOOKEEPER_HEAP_OPTS:--Xmx128m -Xms16m}"

CLUSTER_NODES=(clickhouse-1-1 clickhouse-1-2 clickhouse-2-1 clickhouse-2-2)
CLUSTER_SERVICES=(zookeeper "${CLUSTER_NODES[@]}")

CLUSTER_SRC="$CH_SRC/cluster"
CLUSTER_DIR="$STACK_DIR/cluster"
ZK_DIR="$CLUSTER_DIR/zookeeper"
ZK_CONF="$ZK_DIR/zoo.cfg"
ZK_PID="$ZK_DIR/zookeeper.pid"
ZK_LOG="$ZK_DIR/logs/zookeeper.log"
ZK_STDOUT="$ZK_DIR/logs/stdout.log"

# Debian's jars. Not /usr/share/java/* (several logging backends and a lot more): the server,
# its wire format, slf4j and one backend (slf4j-simple, configured by system properties). The
# other jars zookeeper.jar needs (netty, metrics, ...) are named by its manifest's Class-Path,
# none of them a logging backend.
ZK_JAVA_DIR=/usr/share/java
ZK_JARS=(zookeeper zookeeper-jute slf4j-api slf4j-simple)
# A small server: serial GC, C1 only.
ZK_JVM_OPTS=(-XX:+UseSerialGC -XX:TieredStopAtLevel=1 -XX:+ExitOnOutOfMemoryError
    -Djava.awt.headless=true -Dzookeeper.jmx.log4j.disable=true -Dzookeeper.admin.enableServer=false
    -Dorg.slf4j.simpleLogger.defaultLogLevel=info -Dorg.slf4j.simpleLogger.showDateTime=true
    "-Dorg.slf4j.simpleLogger.dateTimeFormat=yyyy-MM-dd HH:mm:ss.SSS")

# The database the distributed DDL check creates and drops ON CLUSTER.
CLUSTER_PROBE_DB=sink_stack_probe

# ---------------------------------------------------------------------------------------------
# names, dirs and ports

cluster_is_node() { [[ "$1" =~ ^clickhouse-[12]-[12]$ ]]; }

# 1..4, shard-major.
node_index() {
    local s="${1#clickhouse-}"
    echo $(((${s%-*} - 1) * 2 + ${s#*-}))
}
node_shard() {
    local s="${1#clickhouse-}"
    echo "${s%-*}"
}
node_dir() { echo "$CLUSTER_DIR/$1"; }
node_conf() { echo "$CLUSTER_DIR/$1/config.xml"; }
node_tcp_port() { echo $((CLUSTER_TCP_PORT_BASE + $(node_index "$1"))); }
node_http_port() { echo $((CLUSTER_HTTP_PORT_BASE + $(node_index "$1"))); }
node_interserver_port() { echo $((CLUSTER_INTERSERVER_PORT_BASE + $(node_index "$1"))); }

# True if any of "$@" is a cluster service.
cluster_named() {
    local svc
    for svc in "$@"; do
        cluster_service_ok "$svc" && return 0
    done
    return 1
}

# ---------------------------------------------------------------------------------------------
# ZooKeeper

zookeeper_classpath() {
    local jar cp=()
    for jar in "${ZK_JARS[@]}"; do
        [[ -f "$ZK_JAVA_DIR/$jar.jar" ]] || return 1
        cp+=("$ZK_JAVA_DIR/$jar.jar")
    done
    (
        IFS=:
        echo "${cp[*]}"
    )
}

zookeeper_start() {
    local cp
    cp="$(zookeeper_classpath)" || die "zookeeper: jars missing in $ZK_JAVA_DIR (apt-get install zookeeper)"
    command -v java >/dev/null 2>&1 || die "java not found (apt-get install openjdk-17-jre-headless)"
    mkdir -p "$ZK_DIR/data" "$ZK_DIR/logs"
    sed -e "s#@ZK_DATA_DIR@#$ZK_DIR/data#g" -e "s#@ZK_PORT@#$ZK_PORT#g" \
        "$CLUSTER_SRC/zoo.cfg.in" >"$ZK_CONF.tmp"
    mv "$ZK_CONF.tmp" "$ZK_CONF"
    log "zookeeper: starting on 127.0.0.1:$ZK_PORT"
    # shellcheck disable=SC2206 # the heap options are meant to split into words
    local heap=($ZK_HEAP_OPTS)
    (cd "$ZK_DIR" && launch "$ZK_PID" "$ZK_STDOUT" \
        java "${heap[@]}" "${ZK_JVM_OPTS[@]}" -Dorg.slf4j.simpleLogger.logFile="$ZK_LOG" \
        -cp "$cp" org.apache.zookeeper.server.ZooKeeperServerMain "$ZK_CONF")
}

# `ruok` answers before the server takes sessions; `srvr` prints "Mode: standalone" only once it
# serves requests.
zookeeper_answers() {
    local out
    # shellcheck disable=SC2016 # $1 is the inner shell's
    out="$(timeout 3 bash -c 'exec 3<>"/dev/tcp/127.0.0.1/$1" && printf srvr >&3 && cat <&3' \
        _ "$ZK_PORT" 2>/dev/null)" || return 1
    [[ "$out" == *"Mode: "* ]]
}

# ---------------------------------------------------------------------------------------------
# ClickHouse nodes

# sed arguments that fill in the placeholders of the node templates for node $1.
node_template_args() {
    local node="$1" other sr
    printf '%s\n' -e "s#@CH_DIR@#$(node_dir "$node")#g" \
        -e "s#@CH_HTTP_PORT@#$(node_http_port "$node")#g" \
        -e "s#@CH_TCP_PORT@#$(node_tcp_port "$node")#g" \
        -e "s#@NODE_INTERSERVER_PORT@#$(node_interserver_port "$node")#g" \
        -e "s#@ZK_PORT@#$ZK_PORT#g" -e "s#@CLUSTER@#$CLUSTER_NAME#g" \
        -e "s#@SHARD@#$(node_shard "$node")#g" -e "s#@NODE@#$node#g"
    for other in "${CLUSTER_NODES[@]}"; do
        # clickhouse-1-2 -> @NODE_1_2_TCP_PORT@
        sr="${other#clickhouse-}"
        printf '%s\n' -e "s#@NODE_${sr/-/_}_TCP_PORT@#$(node_tcp_port "$other")#g"
    done
}

# Write one template: $1 source, $2 destination, $3 node.
node_render() {
    local args
    mapfile -t args < <(node_template_args "$3")
    sed "${args[@]}" "$1" >"$2.tmp"
    mv "$2.tmp" "$2"
}

node_write_config() {
    local node="$1" dir
    dir="$(node_dir "$node")"
    mkdir -p "$dir/logs" "$dir/data" "$dir/config.d" "$dir/users.d"
    node_render "$CH_SRC/config.xml.in" "$dir/config.xml" "$node"
    node_render "$CH_SRC/users.xml.in" "$dir/users.xml" "$node"
    node_render "$CLUSTER_SRC/config.xml.in" "$dir/config.d/cluster.xml" "$node"
    node_render "$CLUSTER_SRC/users.xml.in" "$dir/users.d/cluster.xml" "$node"
}

node_start() {
    local node="$1" bin dir
    bin="$(clickhouse_server_bin)" || die "clickhouse-server not found"
    dir="$(node_dir "$node")"
    # 18.16 attaches replicated tables at startup and exits if ZooKeeper does not answer.
    service_pid zookeeper >/dev/null ||
        warn "$node: zookeeper is not running; a node with replicated tables exits at startup without it"
    node_write_config "$node"
    log "$node: starting on 127.0.0.1:$(node_tcp_port "$node") (native), :$(node_http_port "$node") (http)," \
        ":$(node_interserver_port "$node") (interserver); shard $(node_shard "$node"), replica $node"
    (cd "$dir" && launch "$dir/clickhouse.pid" "$dir/logs/stdout.log" "$bin" --config-file="$dir/config.xml")
}

# The client command (one word per line) for node $1, TSV output.
node_client() {
    clickhouse_client_cmd || die "clickhouse-client not found"
    printf '%s\n' --host 127.0.0.1 --port "$(node_tcp_port "$1")" --user default --format TSV
}

# One round of ON CLUSTER DDL within $1 seconds: create and drop a database on every node. Each
# statement answers one row per node (host, port, status, error, ...); all must say status 0.
cluster_ddl_roundtrip() {
    local timeout="$1" client q out
    mapfile -t client < <(node_client "${CLUSTER_NODES[0]}")
    for q in "CREATE DATABASE IF NOT EXISTS $CLUSTER_PROBE_DB ON CLUSTER $CLUSTER_NAME" \
        "DROP DATABASE IF EXISTS $CLUSTER_PROBE_DB ON CLUSTER $CLUSTER_NAME"; do
        echo "> $q"
        out="$(timeout $((timeout + 10)) "${client[@]}" --distributed_ddl_task_timeout="$timeout" \
            --query "$q" 2>&1)" || {
            echo "$out"
            return 1
        }
        echo "$out"
        [[ "$(awk -F'\t' '$3 == "0"' <<<"$out" | wc -l)" == "${#CLUSTER_NODES[@]}" ]] || return 1
    done
}

# Once ZooKeeper and all nodes run: wait until ON CLUSTER DDL works and no replicated table is
# read-only. With one of them down neither can be had (a test may have killed it on purpose).
cluster_wait_ready() {
    local svc pid missing=()
    for svc in "${CLUSTER_SERVICES[@]}"; do
        if ! pid="$(service_pid "$svc")"; then
            missing+=("$svc (not running)")
        elif [[ "$(sed 's/.*) //' "/proc/$pid/stat" 2>/dev/null | cut -d' ' -f1)" == T ]]; then
            missing+=("$svc (stopped by a signal)")
        fi
    done
    if ((${#missing[@]})); then
        warn "cluster: not checking distributed DDL and read-only tables: ${missing[*]}"
        return 0
    fi
    cluster_wait_ddl && cluster_wait_writable
}

# Wait (at most $WAIT_TIMEOUT s) until ON CLUSTER DDL runs on all nodes: every node has its
# ZooKeeper session and its DDL worker.
cluster_wait_ddl() {
    local svc start deadline left out="$CLUSTER_DIR/ddl-probe.out"
    start="$(now)"
    deadline=$((start + WAIT_TIMEOUT))
    log "cluster: waiting until ON CLUSTER $CLUSTER_NAME DDL runs on all nodes (at most ${WAIT_TIMEOUT}s)"
    while :; do
        left=$((deadline - $(now)))
        ((left > 30)) && left=30
        ((left < 5)) && left=5
        cluster_ddl_roundtrip "$left" >"$out" 2>&1 && break
        if (($(now) >= deadline)); then
            printf '[stack] ERROR: cluster: ON CLUSTER DDL did not succeed on all nodes within %ss\n' \
                "$WAIT_TIMEOUT" >&2
            show_log "$out" 20
            for svc in "${CLUSTER_NODES[@]}"; do
                [[ -s "$(node_dir "$svc")/logs/clickhouse-server.err.log" ]] &&
                    show_log "$(node_dir "$svc")/logs/clickhouse-server.err.log" 10
            done
            return 1
        fi
        sleep 1
    done
    SUMMARY_LINES+=("cluster $CLUSTER_NAME: ON CLUSTER DDL ran on all ${#CLUSTER_NODES[@]} nodes after $(($(now) - start))s")
    log "cluster: distributed DDL works"
}

# Wait (at most $WAIT_TIMEOUT s) until no replicated table on any node is read-only. After a
# ZooKeeper restart a table whose session expired reconnects on its own, but 18.16 retries a
# failed reconnect only every 10 s (fixed): `up zookeeper` returns once inserts work again.
cluster_wait_writable() {
    local node client n start deadline told=0
    start="$(now)"
    deadline=$((start + WAIT_TIMEOUT))
    for node in "${CLUSTER_NODES[@]}"; do
        mapfile -t client < <(node_client "$node")
        told=0
        while :; do
            n="$(timeout 10 "${client[@]}" --query 'SELECT count() FROM system.replicas WHERE is_readonly' 2>&1)" &&
                [[ "$n" == 0 ]] && break
            if (($(now) >= deadline)); then
                printf '[stack] ERROR: %s: replicated tables still read-only after %ss (%s)\n' \
                    "$node" "$WAIT_TIMEOUT" "$n" >&2
                return 1
            fi
            if ((!told)); then
                log "cluster: waiting until the replicated tables of $node leave read-only mode"
                told=1
            fi
            sleep 0.3
        done
    done
    SUMMARY_LINES+=("cluster $CLUSTER_NAME: no read-only replicated table on any node after $(($(now) - start))s")
}

# ---------------------------------------------------------------------------------------------
# hooks for stack.sh's generic service functions

cluster_service_ok() { [[ "$1" == zookeeper ]] || cluster_is_node "$1"; }

cluster_pid_file_of() {
    if [[ "$1" == zookeeper ]]; then echo "$ZK_PID"; else echo "$(node_dir "$1")/clickhouse.pid"; fi
}

cluster_port_of() {
    if [[ "$1" == zookeeper ]]; then echo "$ZK_PORT"; else node_tcp_port "$1"; fi
}

# Every port the service listens on (checked free before a start).
cluster_ports_of() {
    if [[ "$1" == zookeeper ]]; then
        echo "$ZK_PORT"
    else
        node_tcp_port "$1"
        node_http_port "$1"
        node_interserver_port "$1"
    fi
}

cluster_main_log_of() {
    if [[ "$1" == zookeeper ]]; then echo "$ZK_LOG"; else echo "$(node_dir "$1")/logs/clickhouse-server.log"; fi
}

# True if command line $2 is this stack's process for service $1.
cluster_owns() {
    if [[ "$1" == zookeeper ]]; then
        [[ "$2" == *ZooKeeperServerMain*"$ZK_CONF"* ]]
    else
        [[ "$2" == *"$(node_conf "$1")"* ]]
    fi
}

# Appends the Debian packages service $1 needs, if missing, to the caller's pkgs array.
cluster_packages() {
    if [[ "$1" == zookeeper ]]; then
        zookeeper_classpath >/dev/null || pkgs+=(zookeeper)
        command -v java >/dev/null 2>&1 || pkgs+=(openjdk-17-jre-headless)
    else
        clickhouse_server_bin >/dev/null || pkgs+=(clickhouse-server)
        clickhouse_client_cmd >/dev/null || pkgs+=(clickhouse-client)
    fi
}

cluster_start() {
    if [[ "$1" == zookeeper ]]; then zookeeper_start; else node_start "$1"; fi
}

cluster_answers() {
    if [[ "$1" == zookeeper ]]; then
        zookeeper_answers
    else
        clickhouse_answers "$(node_http_port "$1")" "$(node_tcp_port "$1")"
    fi
}

cluster_fail_logs() {
    local dir
    if [[ "$1" == zookeeper ]]; then
        show_log "$ZK_LOG"
        [[ -s "$ZK_STDOUT" ]] && show_log "$ZK_STDOUT" 15
    else
        dir="$(node_dir "$1")"
        show_log "$dir/logs/clickhouse-server.log"
        [[ -s "$dir/logs/clickhouse-server.err.log" ]] && show_log "$dir/logs/clickhouse-server.err.log" 15
        [[ -s "$dir/logs/stdout.log" ]] && show_log "$dir/logs/stdout.log" 15
    fi
    return 0
}

cluster_describe() {
    if [[ "$1" == zookeeper ]]; then
        echo "127.0.0.1:$ZK_PORT, log $ZK_LOG"
    else
        echo "127.0.0.1:$(node_tcp_port "$1") native / :$(node_http_port "$1") http /" \
            ":$(node_interserver_port "$1") interserver, shard $(node_shard "$1"), log $(cluster_main_log_of "$1")"
    fi
}

# Dropping the data of only some cluster services leaves the others' replication metadata
# pointing at it: purge the cluster as a whole (`down --purge cluster`).
cluster_purge() {
    log "$1: removing data and logs"
    if [[ "$1" == zookeeper ]]; then rm -rf "$ZK_DIR"; else rm -rf "$(node_dir "$1")"; fi
    # The last one out removes the cluster dir (a plain `down` then no longer looks at the cluster).
    if [[ -d "$CLUSTER_DIR" ]] && ! compgen -G "$CLUSTER_DIR/*/" >/dev/null; then
        rm -rf "$CLUSTER_DIR"
    fi
}

cluster_print_env() {
    local node nodes=()
    for node in "${CLUSTER_NODES[@]}"; do
        nodes+=("127.0.0.1:$(node_tcp_port "$node")")
    done
    echo "export CLICKHOUSE_URL=clickhouse://default:@127.0.0.1:$(node_tcp_port "${CLUSTER_NODES[0]}")/default"
    echo "export CLICKHOUSE_CLUSTER=$CLUSTER_NAME"
    echo "export CLICKHOUSE_NODES=$(
        IFS=,
        echo "${nodes[*]}"
    )"
    echo "export ZOOKEEPER_HOSTS=127.0.0.1:$ZK_PORT"
}

# `up`, cluster part, first half: ZooKeeper first and answering (a node that starts without it
# cannot attach its replicated tables), then the nodes are launched.
cluster_up_start() {
    local svc
    if [[ " $* " == *" zookeeper "* ]]; then
        start_service zookeeper
        wait_service zookeeper || return 1
    fi
    for svc in "${CLUSTER_NODES[@]}"; do
        [[ " $* " == *" $svc "* ]] && start_service "$svc"
    done
    return 0
}

# `up`, cluster part, second half: each node answers, then ON CLUSTER DDL works.
cluster_up_wait() {
    local svc failed=0
    for svc in "${CLUSTER_NODES[@]}"; do
        if [[ " $* " == *" $svc "* ]]; then
            wait_service "$svc" || failed=1
        fi
    done
    ((failed == 0)) || return 1
    cluster_named "$@" || return 0
    cluster_wait_ready
}
