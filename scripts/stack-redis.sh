# shellcheck shell=bash
# The Redis topologies of scripts/stack.sh, which sources this file (it is not run on its own),
# for the dedup store's sentinel and cluster modes; Debian's redis-server, everything on
# 127.0.0.1, each process started, killed and restarted on its own.
#
# Sentinel (`--redis-sentinel`, group "redis-sentinel"): redis-ha-1 (the first master),
# redis-ha-2 and redis-ha-3 (its replicas), and redis-sentinel-1..3 (redis-server --sentinel,
# quorum 2) monitoring them under the name "sink-dedup". Failover is quick on purpose:
# down-after-milliseconds 1000, failover-timeout 3000. `env --redis-sentinel` prints
# REDIS_SENTINELS (host:port of each sentinel), REDIS_SENTINEL_MASTER and REDIS_SENTINEL_NODES
# (host:port of redis-ha-1..3, in order, to tell which one to kill).
#
# Cluster (`--redis-cluster`, group "redis-cluster"): redis-cluster-1..6 in cluster mode,
# cluster-node-timeout 1000; `up` creates the cluster (three masters with one replica each,
# `redis-cli --cluster create --cluster-replicas 1`) once all six run and none belongs to a
# cluster yet; a node restarted later rejoins from its nodes.conf. `env --redis-cluster`
# prints REDIS_CLUSTER_NODES (host:port of redis-cluster-1..6, in order).
#
# A data node or cluster node writes its config once (redis and the sentinels rewrite theirs
# after a failover) and keeps AOF on. Layout under <stack>/redis-sentinel/ and
# <stack>/redis-cluster/: one dir per process with its .conf, data, log and pid file.

REDIS_HA_PORT_BASE="${SINK_REDIS_HA_PORT_BASE:-17200}"
REDIS_SENTINEL_PORT_BASE="${SINK_REDIS_SENTINEL_PORT_BASE:-17300}"
REDIS_CLUSTER_PORT_BASE="${SINK_REDIS_CLUSTER_PORT_BASE:-17100}"
REDIS_SENTINEL_MASTER=sink-dedup

REDIS_HA_NODES=(redis-ha-1 redis-ha-2 redis-ha-3)
REDIS_SENTINELS=(redis-sentinel-1 redis-sentinel-2 redis-sentinel-3)
# Sentinels first: `down` stops them before the data nodes (no failover while stopping).
# shellcheck disable=SC2034 # used by stack.sh
REDIS_SENTINEL_SERVICES=("${REDIS_SENTINELS[@]}" "${REDIS_HA_NODES[@]}")
REDIS_CLUSTER_SERVICES=(redis-cluster-1 redis-cluster-2 redis-cluster-3 redis-cluster-4
    redis-cluster-5 redis-cluster-6)

REDIS_SENTINEL_DIR="$STACK_DIR/redis-sentinel"
REDIS_CLUSTER_DIR="$STACK_DIR/redis-cluster"

# ---------------------------------------------------------------------------------------------
# names, dirs and ports

redis_topo_service_ok() { [[ "$1" =~ ^redis-(ha|sentinel)-[123]$ || "$1" =~ ^redis-cluster-[1-6]$ ]]; }

redis_topo_index() { echo "${1##*-}"; }

redis_topo_dir() {
    if [[ "$1" == redis-cluster-* ]]; then echo "$REDIS_CLUSTER_DIR/$1"; else echo "$REDIS_SENTINEL_DIR/$1"; fi
}

redis_topo_port_of() {
    local k
    k="$(redis_topo_index "$1")"
    case "$1" in
        redis-ha-*) echo $((REDIS_HA_PORT_BASE + k)) ;;
        redis-sentinel-*) echo $((REDIS_SENTINEL_PORT_BASE + k)) ;;
        redis-cluster-*) echo $((REDIS_CLUSTER_PORT_BASE + k)) ;;
    esac
}

# A cluster node also listens on its bus port, port + 10000.
redis_topo_ports_of() {
    redis_topo_port_of "$1"
    [[ "$1" != redis-cluster-* ]] || echo $(($(redis_topo_port_of "$1") + 10000))
}

redis_topo_pid_file_of() { echo "$(redis_topo_dir "$1")/redis.pid"; }
redis_topo_main_log_of() { echo "$(redis_topo_dir "$1")/redis.log"; }

redis_topo_cli() {
    local port="$1"
    shift
    timeout 5 redis-cli -h 127.0.0.1 -p "$port" "$@" 2>/dev/null
}

# True if any of "$@" is a service of the sentinel topology ($1 = sentinel) or the cluster.
redis_topo_named() {
    local kind="$1" svc
    shift
    for svc in "$@"; do
        case "$kind:$svc" in
            sentinel:redis-ha-* | sentinel:redis-sentinel-* | cluster:redis-cluster-*) return 0 ;;
        esac
    done
    return 1
}

# ---------------------------------------------------------------------------------------------
# configs

redis_topo_write_config() {
    local svc="$1" dir port conf
    dir="$(redis_topo_dir "$svc")"
    port="$(redis_topo_port_of "$svc")"
    mkdir -p "$dir"
    case "$svc" in
        redis-sentinel-*) conf="$dir/sentinel.conf" ;;
        *) conf="$dir/redis.conf" ;;
    esac
    # Written once: redis (CONFIG REWRITE after a failover) and the sentinels keep their state there.
    [[ -s "$conf" ]] && return 0
    {
        echo "bind 127.0.0.1"
        echo "port $port"
        echo "dir $dir"
        echo "logfile $dir/redis.log"
        echo "daemonize no"
        case "$svc" in
            redis-sentinel-*)
                echo "sentinel resolve-hostnames no"
                echo "sentinel monitor $REDIS_SENTINEL_MASTER 127.0.0.1 $(redis_topo_port_of redis-ha-1) 2"
                echo "sentinel down-after-milliseconds $REDIS_SENTINEL_MASTER 1000"
                echo "sentinel failover-timeout $REDIS_SENTINEL_MASTER 3000"
                echo "sentinel parallel-syncs $REDIS_SENTINEL_MASTER 2"
                ;;
            *)
                echo "protected-mode yes"
                echo "save \"\""
                echo "appendonly yes"
                echo "appendfsync everysec"
                echo "repl-diskless-sync yes"
                echo "repl-diskless-sync-delay 0"
                if [[ "$svc" == redis-cluster-* ]]; then
                    echo "cluster-enabled yes"
                    echo "cluster-config-file nodes.conf"
                    echo "cluster-node-timeout 1000"
                    # A replica takes over however long it was cut off; the other masters
                    # keep serving their slots while one has none.
                    echo "cluster-replica-validity-factor 0"
                    echo "cluster-require-full-coverage no"
                elif [[ "$svc" != redis-ha-1 ]]; then
                    echo "replicaof 127.0.0.1 $(redis_topo_port_of redis-ha-1)"
                fi
                ;;
        esac
    } >"$conf.tmp"
    mv "$conf.tmp" "$conf"
}

# ---------------------------------------------------------------------------------------------
# hooks for stack.sh's generic service functions

redis_topo_owns() {
    # redis rewrites its process title; it runs in its own dir (`dir`), which tells ours apart.
    [[ "$2" == *redis-server* || "$2" == *redis-sentinel* ]] || return 1
    local pid
    pid="$(tr -dc '0-9' <"$(redis_topo_pid_file_of "$1")")"
    [[ "$(readlink "/proc/$pid/cwd" 2>/dev/null)" == "$(redis_topo_dir "$1")" ]]
}

redis_topo_packages() {
    redis_server_bin >/dev/null || pkgs+=(redis-server)
    command -v redis-cli >/dev/null 2>&1 || pkgs+=(redis-tools)
}

redis_topo_start() {
    local svc="$1" bin dir args=()
    bin="$(redis_server_bin)" || die "redis-server not found"
    dir="$(redis_topo_dir "$svc")"
    redis_topo_write_config "$svc"
    # Debian's redis-sentinel is this same program started with --sentinel.
    if [[ "$svc" == redis-sentinel-* ]]; then
        args=("$dir/sentinel.conf" --sentinel)
    else
        args=("$dir/redis.conf")
    fi
    log "$svc: starting on 127.0.0.1:$(redis_topo_port_of "$svc")"
    (cd "$dir" && launch "$dir/redis.pid" "$dir/stdout.log" "$bin" "${args[@]}")
}

redis_topo_answers() {
    [[ "$(redis_topo_cli "$(redis_topo_port_of "$1")" PING)" == PONG ]]
}

redis_topo_fail_logs() {
    local dir
    dir="$(redis_topo_dir "$1")"
    show_log "$dir/redis.log"
    [[ -s "$dir/stdout.log" ]] && show_log "$dir/stdout.log" 15
    return 0
}

redis_topo_describe() {
    local role=""
    case "$1" in
        redis-ha-*)
            role="$(redis_topo_cli "$(redis_topo_port_of "$1")" ROLE | head -n1)"
            role=", role ${role:-unknown}"
            ;;
    esac
    echo "127.0.0.1:$(redis_topo_port_of "$1")$role, log $(redis_topo_main_log_of "$1")"
}

redis_topo_purge() {
    log "$1: removing data and logs"
    rm -rf "$(redis_topo_dir "$1")"
    local parent
    for parent in "$REDIS_SENTINEL_DIR" "$REDIS_CLUSTER_DIR"; do
        if [[ -d "$parent" ]] && ! compgen -G "$parent/*/" >/dev/null; then
            rm -rf "$parent"
        fi
    done
}

redis_topo_print_env() {
    local svc list=()
    if [[ "$1" == sentinel ]]; then
        for svc in "${REDIS_SENTINELS[@]}"; do list+=("127.0.0.1:$(redis_topo_port_of "$svc")"); done
        echo "export REDIS_SENTINELS=$(IFS=, && echo "${list[*]}")"
        echo "export REDIS_SENTINEL_MASTER=$REDIS_SENTINEL_MASTER"
        list=()
        for svc in "${REDIS_HA_NODES[@]}"; do list+=("127.0.0.1:$(redis_topo_port_of "$svc")"); done
        echo "export REDIS_SENTINEL_NODES=$(IFS=, && echo "${list[*]}")"
    else
        for svc in "${REDIS_CLUSTER_SERVICES[@]}"; do list+=("127.0.0.1:$(redis_topo_port_of "$svc")"); done
        echo "export REDIS_CLUSTER_NODES=$(IFS=, && echo "${list[*]}")"
    fi
}

# ---------------------------------------------------------------------------------------------
# readiness of the topologies

# Wait until $1 (a description) holds, checked by "${@:2}", at most $WAIT_TIMEOUT s.
redis_topo_until() {
    local what="$1" deadline
    shift
    deadline=$(($(now) + WAIT_TIMEOUT))
    until "$@"; do
        if (($(now) >= deadline)); then
            printf '[stack] ERROR: %s: not within %ss\n' "$what" "$WAIT_TIMEOUT" >&2
            return 1
        fi
        sleep 0.3
    done
}

# The address the sentinel on port $1 names as the master.
redis_sentinel_master_of() {
    redis_topo_cli "$1" SENTINEL get-master-addr-by-name "$REDIS_SENTINEL_MASTER" | paste -sd:
}

# Every running sentinel names one master, which runs, has every other running data node as a
# connected replica, and every running sentinel knows all the others (a failover needs a quorum).
redis_sentinel_settled() {
    local svc port master="" named running_nodes=0 running_sentinels=0 info
    for svc in "${REDIS_SENTINELS[@]}"; do
        service_pid "$svc" >/dev/null && running_sentinels=$((running_sentinels + 1))
    done
    for svc in "${REDIS_HA_NODES[@]}"; do
        service_pid "$svc" >/dev/null && running_nodes=$((running_nodes + 1))
    done
    for svc in "${REDIS_SENTINELS[@]}"; do
        service_pid "$svc" >/dev/null || continue
        port="$(redis_topo_port_of "$svc")"
        named="$(redis_sentinel_master_of "$port")" || return 1
        [[ -n "$named" && ( -z "$master" || "$named" == "$master" ) ]] || return 1
        master="$named"
        info="$(redis_topo_cli "$port" SENTINEL master "$REDIS_SENTINEL_MASTER" | paste -sd' ')"
        [[ " $info " == *" num-other-sentinels $((running_sentinels - 1)) "* ]] || return 1
    done
    [[ -n "$master" ]] || return 0
    info="$(redis_topo_cli "${master##*:}" INFO replication)" || return 1
    [[ "$info" == *role:master* ]] || return 1
    [[ "$info" == *"connected_slaves:$((running_nodes - 1))"* ]]
}

redis_cluster_all_running() {
    local svc
    for svc in "${REDIS_CLUSTER_SERVICES[@]}"; do
        service_pid "$svc" >/dev/null || return 1
    done
}

# Once: three masters and three replicas, slots spread over the masters.
redis_cluster_create() {
    local svc nodes=() first
    first="$(redis_topo_port_of "${REDIS_CLUSTER_SERVICES[0]}")"
    [[ "$(redis_topo_cli "$first" CLUSTER INFO)" == *cluster_known_nodes:1* ]] || return 0
    for svc in "${REDIS_CLUSTER_SERVICES[@]}"; do nodes+=("127.0.0.1:$(redis_topo_port_of "$svc")"); done
    log "redis-cluster: creating the cluster (3 masters, 1 replica each)"
    redis-cli --cluster create "${nodes[@]}" --cluster-replicas 1 --cluster-yes \
        >"$REDIS_CLUSTER_DIR/create.log" 2>&1 || {
        show_log "$REDIS_CLUSTER_DIR/create.log"
        return 1
    }
}

# Every running node says cluster_state:ok and knows all six, and every master has its replica.
redis_cluster_settled() {
    local svc port info masters
    for svc in "${REDIS_CLUSTER_SERVICES[@]}"; do
        service_pid "$svc" >/dev/null || continue
        port="$(redis_topo_port_of "$svc")"
        info="$(redis_topo_cli "$port" CLUSTER INFO)" || return 1
        [[ "$info" == *cluster_state:ok* && "$info" == *cluster_known_nodes:6* ]] || return 1
    done
    redis_cluster_all_running || return 0
    # Masters that serve slots and are not failing.
    masters="$(redis_topo_cli "$port" CLUSTER NODES | awk '$3 ~ /master/ && $3 !~ /fail/ && NF > 8' | wc -l)"
    [[ "$masters" == 3 ]] || return 1
    for svc in "${REDIS_CLUSTER_SERVICES[@]}"; do
        info="$(redis_topo_cli "$(redis_topo_port_of "$svc")" INFO replication)" || return 1
        [[ "$info" != *role:master* || "$info" == *connected_slaves:1* ]] || return 1
    done
}

# `up`, first half: sentinel data nodes, then their sentinels; the cluster nodes.
redis_topo_up_start() {
    local svc
    for svc in "${REDIS_HA_NODES[@]}" "${REDIS_SENTINELS[@]}" "${REDIS_CLUSTER_SERVICES[@]}"; do
        [[ " $* " == *" $svc "* ]] && start_service "$svc"
    done
    return 0
}

# `up`, second half: each answers, then the topology has settled (the cluster created first).
redis_topo_up_wait() {
    local svc failed=0 start
    for svc in "${REDIS_HA_NODES[@]}" "${REDIS_SENTINELS[@]}" "${REDIS_CLUSTER_SERVICES[@]}"; do
        if [[ " $* " == *" $svc "* ]]; then
            wait_service "$svc" || failed=1
        fi
    done
    ((failed == 0)) || return 1
    start="$(now)"
    if redis_topo_named sentinel "$@"; then
        redis_topo_until "redis-sentinel: one master named by all sentinels, its replicas attached" \
            redis_sentinel_settled || return 1
        SUMMARY_LINES+=("redis-sentinel: master $(redis_sentinel_master_of "$(redis_topo_port_of redis-sentinel-1)") settled after $(($(now) - start))s")
    fi
    if redis_topo_named cluster "$@"; then
        if redis_cluster_all_running; then
            redis_cluster_create || return 1
        fi
        redis_topo_until "redis-cluster: cluster_state ok on every node, each master with its replica" \
            redis_cluster_settled || return 1
        SUMMARY_LINES+=("redis-cluster: settled after $(($(now) - start))s")
    fi
    return 0
}
