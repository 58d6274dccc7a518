#!/usr/bin/env bash
# RaftKV node: the one start script (Docker image, docker-compose and `raftkv cluster up`).
#
# Starts the storage engine, waits until its StateMachine gRPC port answers, then starts the
# Raft sidecar pointed at it. Exits as soon as either process exits (stopping the other one),
# with that process's exit status. SIGTERM/SIGINT are forwarded to both processes as SIGTERM;
# after such a requested stop the script exits 0 when both processes stopped cleanly.
#
# Environment (defaults in brackets):
#   NODE_ID [node1]          Raft id of this node
#   BOOTSTRAP [false]        "true" on the first node of a new cluster
#   JOIN_ADDR [""]           HOST:MGMT_PORT of a member to join (e.g. node1:6000)
#   HTTP_PORT [8080]         client HTTP API
#   RAFT_PORT [8088]         Raft transport
#   MGMT_PORT [6000]         management HTTP API (/join /leave /status /health)
#   APP_PORT [50051]         engine StateMachine gRPC (loopback only)
#   SIDE_PORT [50052]        sidecar RaftNode gRPC (loopback only)
#   DATA_DIR [/app/data]     engine data in $DATA_DIR/kv.db, Raft data in $DATA_DIR/raft
#   ADVERTISE [$NODE_ID]     host other nodes use to reach this one
#   BIND_HOST [0.0.0.0]      listen address of the client, Raft and management ports
#   PYTHON [python3]         interpreter that has storage_engine and raft_sidecar installed
#   CLUSTER_TOKEN [unset]    token for mutating management calls; passed via the environment only
#   RAFT_SECRET [unset]      secret that encrypts and authenticates Raft traffic (same on every node)
#   RAFTKV_CLIENT_TOKEN [unset] bearer token every client HTTP request must carry (/health stays open)
#   CLUSTER_TOKEN_FILE, RAFT_SECRET_FILE, RAFTKV_CLIENT_TOKEN_FILE [unset]
#                            the same secrets read from files (e.g. /run/secrets/...); a file beats
#                            the plain variable. TLS: ENGINE_ARGS="--tls-cert-file F --tls-key-file F".
#                            See docs/security.md.
#   LOG_LEVEL [unset]        passed to both processes as --log-level when set
#   ENGINE_START_TIMEOUT [60] seconds to wait for the engine's gRPC port
#   STOP_TIMEOUT [20]        seconds to wait for a process after SIGTERM before SIGKILL
#   ENGINE_ARGS, SIDECAR_ARGS extra arguments appended verbatim (split on whitespace)
#
# A restarted node keeps its Raft membership in $DATA_DIR/raft; the sidecar then ignores
# BOOTSTRAP and JOIN_ADDR, so the same environment can be used for every start.
set -u

if ((BASH_VERSINFO[0] < 4 || (BASH_VERSINFO[0] == 4 && BASH_VERSINFO[1] < 4))); then
    echo "entrypoint.sh needs bash >= 4.4 (found $BASH_VERSION)" >&2
    exit 2
fi

NODE_ID="${NODE_ID:-node1}"
BOOTSTRAP="${BOOTSTRAP:-false}"
JOIN_ADDR="${JOIN_ADDR:-}"
HTTP_PORT="${HTTP_PORT:-8080}"
RAFT_PORT="${RAFT_PORT:-8088}"
MGMT_PORT="${MGMT_PORT:-6000}"
APP_PORT="${APP_PORT:-50051}"
SIDE_PORT="${SIDE_PORT:-50052}"
DATA_DIR="${DATA_DIR:-/app/data}"
ADVERTISE="${ADVERTISE:-$NODE_ID}"
BIND_HOST="${BIND_HOST:-0.0.0.0}"
PYTHON="${PYTHON:-python3}"
LOG_LEVEL="${LOG_LEVEL:-}"
ENGINE_START_TIMEOUT="${ENGINE_START_TIMEOUT:-60}"
STOP_TIMEOUT="${STOP_TIMEOUT:-20}"
ENGINE_ARGS="${ENGINE_ARGS:-}"
SIDECAR_ARGS="${SIDECAR_ARGS:-}"

log() { printf '[entrypoint %s] %s\n' "$NODE_ID" "$*" >&2; }
die() { log "error: $*"; exit 2; }

is_port() { [[ "$1" =~ ^[0-9]+$ ]] && (( 10#$1 >= 1 && 10#$1 <= 65535 )); }
for var in HTTP_PORT RAFT_PORT MGMT_PORT APP_PORT SIDE_PORT; do
    is_port "${!var}" || die "$var must be a port number (1-65535), got '${!var}'"
done
[[ "$ENGINE_START_TIMEOUT" =~ ^[0-9]+$ ]] || die "ENGINE_START_TIMEOUT must be a number of seconds"
[[ "$STOP_TIMEOUT" =~ ^[0-9]+$ ]] || die "STOP_TIMEOUT must be a number of seconds"
[ -n "$NODE_ID" ] || die "NODE_ID must not be empty"

case "${BOOTSTRAP,,}" in
    true|1|yes) BOOTSTRAP=true ;;
    false|0|no|"") BOOTSTRAP=false ;;
    *) die "BOOTSTRAP must be true or false, got '$BOOTSTRAP'" ;;
esac

# Secrets travel in the environment only (never on a command line, where `ps` shows them);
# an empty variable is the same as an unset one.
if [ -n "${CLUSTER_TOKEN:-}" ]; then
    export CLUSTER_TOKEN
else
    unset CLUSTER_TOKEN
fi
export_or_unset() { if [ -n "$2" ]; then export "$1"; else unset "$1"; fi; }
export_or_unset RAFT_SECRET "${RAFT_SECRET:-}"
export_or_unset RAFTKV_CLIENT_TOKEN "${RAFTKV_CLIENT_TOKEN:-}"
export_or_unset CLUSTER_TOKEN_FILE "${CLUSTER_TOKEN_FILE:-}"
export_or_unset RAFT_SECRET_FILE "${RAFT_SECRET_FILE:-}"
export_or_unset RAFTKV_CLIENT_TOKEN_FILE "${RAFTKV_CLIENT_TOKEN_FILE:-}"

mkdir -p -- "$DATA_DIR" || die "cannot create DATA_DIR '$DATA_DIR'"

engine_extra=()
sidecar_extra=()
[ -n "$ENGINE_ARGS" ] && read -r -a engine_extra <<<"$ENGINE_ARGS"
[ -n "$SIDECAR_ARGS" ] && read -r -a sidecar_extra <<<"$SIDECAR_ARGS"
log_args=()
[ -n "$LOG_LEVEL" ] && log_args=(--log-level "$LOG_LEVEL")

engine_cmd=("$PYTHON" -m storage_engine "$HTTP_PORT" "$APP_PORT" "$SIDE_PORT" "$DATA_DIR/kv.db"
            --http-host "$BIND_HOST" "${log_args[@]}" "${engine_extra[@]}")
sidecar_cmd=("$PYTHON" -m raft_sidecar -id "$NODE_ID" -raft "$RAFT_PORT" -srv "$SIDE_PORT"
             -app "127.0.0.1:$APP_PORT" -mgmt "$MGMT_PORT" -data "$DATA_DIR/raft"
             -advertise "$ADVERTISE:$RAFT_PORT" --bind-host "$BIND_HOST")
[ "$BOOTSTRAP" = true ] && sidecar_cmd+=(-bootstrap)
[ -n "$JOIN_ADDR" ] && sidecar_cmd+=(-join "$JOIN_ADDR")
sidecar_cmd+=("${log_args[@]}" "${sidecar_extra[@]}")

engine_pid=""
sidecar_pid=""
stop_requested=""

alive() { [ -n "$1" ] && kill -0 "$1" 2>/dev/null; }

# Send SIGTERM to a child at most once: a second SIGTERM can hit a process that is already
# shutting down (its handler removed) and turn a clean exit into a kill.
termed=" "
term_once() {
    local pid="$1"
    [ -n "$pid" ] || return 0
    case "$termed" in *" $pid "*) return 0 ;; esac
    termed="$termed$pid "
    alive "$pid" && kill -TERM "$pid" 2>/dev/null
    return 0
}

# Forward a stop request to both children. SIGTERM is sent even for SIGINT: children started
# in the background of a non-interactive shell ignore SIGINT.
on_signal() {
    if [ -z "$stop_requested" ]; then
        stop_requested="$1"
        log "received SIG$1, stopping engine and sidecar"
    fi
    term_once "$sidecar_pid"
    term_once "$engine_pid"
}
trap 'on_signal TERM' TERM
trap 'on_signal INT' INT
trap 'on_signal HUP' HUP

# Wait for a child to end, at most STOP_TIMEOUT seconds after sending it SIGTERM, then SIGKILL.
# Sets reaped_status to its exit status.
reaped_status=0
stop_child() {
    local pid="$1" name="$2" deadline
    reaped_status=0
    [ -n "$pid" ] || return 0
    if alive "$pid"; then
        term_once "$pid"
        deadline=$((SECONDS + STOP_TIMEOUT))
        while alive "$pid" && ((SECONDS < deadline)); do
            sleep 0.2
        done
        if alive "$pid"; then
            log "$name (pid $pid) did not stop within ${STOP_TIMEOUT}s, sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null
        fi
    fi
    wait "$pid" 2>/dev/null
    reaped_status=$?
    # `wait` is interrupted (status > 128) by a trapped signal while the child still runs.
    while alive "$pid"; do
        wait "$pid" 2>/dev/null
        reaped_status=$?
    done
}

# Status of a child that stopped because we asked it to counts as a clean stop.
clean_stop_status() {
    case "$1" in
        0|130|143) return 0 ;;
        *) return 1 ;;
    esac
}

finish_after_stop_request() {
    local first_status="$1" first_name="$2" other_pid="$3" other_name="$4"
    stop_child "$other_pid" "$other_name"
    local other_status=$reaped_status
    if clean_stop_status "$first_status" && clean_stop_status "$other_status"; then
        log "stopped"
        exit 0
    fi
    if ! clean_stop_status "$first_status"; then
        log "$first_name exited with status $first_status while stopping"
        exit "$first_status"
    fi
    log "$other_name exited with status $other_status while stopping"
    exit "$other_status"
}

log "starting engine: ${engine_cmd[*]}"
"${engine_cmd[@]}" &
engine_pid=$!

# Wait for the engine's gRPC port, failing fast when the engine dies.
deadline=$((SECONDS + ENGINE_START_TIMEOUT))
while :; do
    if [ -n "$stop_requested" ]; then
        stop_child "$engine_pid" engine
        status=$reaped_status
        clean_stop_status "$status" && exit 0
        exit "$status"
    fi
    if ! alive "$engine_pid"; then
        wait "$engine_pid" 2>/dev/null
        status=$?
        log "engine exited during startup with status $status"
        [ "$status" -eq 0 ] && status=1
        exit "$status"
    fi
    if (exec 3<>"/dev/tcp/127.0.0.1/$APP_PORT") 2>/dev/null; then
        break
    fi
    if ((SECONDS >= deadline)); then
        log "engine did not open 127.0.0.1:$APP_PORT within ${ENGINE_START_TIMEOUT}s"
        stop_child "$engine_pid" engine
        exit 1
    fi
    sleep 0.2
done
log "engine is up (pid $engine_pid)"

log "starting sidecar: ${sidecar_cmd[*]}"
"${sidecar_cmd[@]}" &
sidecar_pid=$!
# A signal that arrived just before the sidecar existed must reach it too.
[ -n "$stop_requested" ] && term_once "$sidecar_pid"

# Wait for the first child to exit.
exited_pid=""
status=0
if ((BASH_VERSINFO[0] > 5 || (BASH_VERSINFO[0] == 5 && BASH_VERSINFO[1] >= 1))) \
        && [ -z "${ENTRYPOINT_POLL_WAIT:-}" ]; then
    while [ -z "${exited_pid:-}" ]; do
        exited_pid=""
        wait -n -p exited_pid "$engine_pid" "$sidecar_pid" 2>/dev/null
        status=$?
        # An empty exited_pid means a trapped signal interrupted the wait: keep waiting.
        exited_pid="${exited_pid:-}"
        if [ -z "$exited_pid" ] && ! alive "$engine_pid" && ! alive "$sidecar_pid"; then
            # Both are gone and already reaped (should not happen): take the engine's status.
            exited_pid=$engine_pid
            wait "$engine_pid" 2>/dev/null
            status=$?
        fi
    done
else
    # Fallback for bash 4.4/5.0 (no `wait -n -p`): poll.
    while :; do
        if ! alive "$engine_pid"; then exited_pid=$engine_pid; break; fi
        if ! alive "$sidecar_pid"; then exited_pid=$sidecar_pid; break; fi
        sleep 0.5
    done
    wait "$exited_pid" 2>/dev/null
    status=$?
fi

if [ "$exited_pid" = "$engine_pid" ]; then
    first=engine; other_pid=$sidecar_pid; other=sidecar
else
    first=sidecar; other_pid=$engine_pid; other=engine
fi

if [ -n "$stop_requested" ]; then
    finish_after_stop_request "$status" "$first" "$other_pid" "$other"
fi

log "$first exited with status $status, stopping $other"
stop_child "$other_pid" "$other"
exit "$status"
