# shellcheck shell=bash
# Shared by bench/admission.sh and bench/flood.sh (sourced, not run). See bench/PIPELINE.md.
# Expects `set -euo pipefail` and $TMP (the run's temp dir) set by the caller.

GATEWAY_BIN=${GATEWAY_BIN:-}
LOAD_BIN=${LOAD_BIN:-}
BUILD=${BUILD:-1}
KEY=${KEY:-bench-access-key-0123456789}

PIDS=()

log() { printf '%s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# Stop every process this run started (TERM, then KILL after 10 s), then remove $TMP.
cleanup() {
  local pid
  for pid in "${PIDS[@]}"; do
    kill -TERM "$pid" 2>/dev/null || true
  done
  for pid in "${PIDS[@]}"; do
    for _ in $(seq 100); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  PIDS=()
  if [[ "${KEEP_TMP:-0}" == 1 ]]; then
    log "kept $TMP"
  else
    rm -rf "$TMP"
  fi
}

forget_pid() {
  local keep=() p
  for p in "${PIDS[@]}"; do [[ "$p" == "$1" ]] || keep+=("$p"); done
  PIDS=("${keep[@]}")
}

# Build the release gateway and the load generator (no-op when current), unless given.
build() {
  if [[ -z "$GATEWAY_BIN" || -z "$LOAD_BIN" ]] && [[ "$BUILD" == 1 ]]; then
    log "building (cargo build --release --bin wpf-gateway --example webhook_load) ..."
    cargo build --release --quiet --bin wpf-gateway --example webhook_load
  fi
  GATEWAY_BIN=${GATEWAY_BIN:-$PWD/target/release/wpf-gateway}
  LOAD_BIN=${LOAD_BIN:-$PWD/target/release/examples/webhook_load}
  [[ -x "$GATEWAY_BIN" ]] || die "no gateway binary at $GATEWAY_BIN"
  [[ -x "$LOAD_BIN" ]] || die "no load generator at $LOAD_BIN"
}

# A free TCP port on 127.0.0.1 below the ephemeral range (so no client socket takes it).
free_port() {
  local port
  for _ in $(seq 200); do
    port=$((20000 + RANDOM % 12000))
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      echo "$port"
      return
    fi
  done
  die "no free port found"
}

# Wait until 127.0.0.1:$1 accepts connections, at most $2 seconds, while pid $3 lives.
wait_port() {
  local port=$1 limit=$2 pid=$3
  for _ in $(seq $((limit * 10))); do
    kill -0 "$pid" 2>/dev/null || return 1
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  return 1
}

# Start the companion upstream: start_upstream PORT LOGFILE [webhook_load upstream args...]
start_upstream() {
  local port=$1 logfile=$2
  shift 2
  "$LOAD_BIN" upstream --listen "127.0.0.1:$port" "$@" >"$logfile" 2>&1 &
  UPSTREAM_PID=$!
  PIDS+=("$UPSTREAM_PID")
  wait_port "$port" 10 "$UPSTREAM_PID" || { cat "$logfile" >&2; die "upstream did not start"; }
}

# Write a gateway config: gateway_config FILE PORT DATA_DIR UPSTREAM_PORT MODE [extra site keys]
gateway_config() {
  local file=$1 port=$2 data=$3 up=$4 mode=$5 extra=${6:-}
  cat >"$file" <<EOF
[server]
listen = ["127.0.0.1:$port"]
data_dir = "$data"
max_connections = 10000

[log]
level = "warn"
access_log = false

[queue]
durability = "fsync"
# Far above any run here (the key allows up to 2^63-1): never 503 for a full queue.
queue_max = 100000000

[[site]]
name = "bench"
upstream = "http://127.0.0.1:$up"
access_key = "$KEY"
mode = "$mode"
$extra
EOF
  if [[ "$mode" == direct ]]; then
    # Direct mode needs a CRM table; these benchmarks never reach it (admission.sh pauses
    # the site; wordpress.sh sends update_tags with the tags in the payload).
    cat >>"$file" <<EOF

[site.crm]
kind = "activecampaign"
url = "http://127.0.0.1:9"
api_key = "not-called-in-this-benchmark"
EOF
  fi
}

# start_gateway CONFIG PORT LOGFILE: start the release gateway, wait until it answers.
start_gateway() {
  local config=$1 port=$2 logfile=$3
  "$GATEWAY_BIN" check --config "$config" >/dev/null || die "config $config rejected"
  "$GATEWAY_BIN" run --config "$config" >"$logfile" 2>&1 &
  GATEWAY_PID=$!
  PIDS+=("$GATEWAY_PID")
  if ! wait_port "$port" 20 "$GATEWAY_PID"; then
    cat "$logfile" >&2
    die "gateway did not start"
  fi
  local code
  code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 5 \
    "http://127.0.0.1:$port/?wpf_action=test&access_key=$KEY") || true
  [[ "$code" == 200 ]] || { cat "$logfile" >&2; die "gateway test webhook answered $code"; }
}

# stop_pid PID: SIGTERM, wait up to 60 s, then SIGKILL.
stop_pid() {
  local pid=$1
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 600); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  forget_pid "$pid"
}

# CPU ticks (1/100 s) a process used: utime + stime.
proc_ticks() {
  awk '{ sub(/.*\) /, ""); print $12 + $13 }' "/proc/$1/stat" 2>/dev/null || echo 0
}

# Busy ticks of the whole machine (all CPUs), from /proc/stat.
machine_ticks() {
  awk '/^cpu / { print $2 + $3 + $4 + $7 + $8 + $9 }' /proc/stat
}

# A field of /proc/PID/status in KiB (VmHWM, VmRSS).
proc_kib() {
  awk -v k="$2:" '$1 == k { print $2 }' "/proc/$1/status"
}

# A value from a `RESULT key=value ...` line: result_field FILE KEY
result_field() {
  grep '^RESULT ' "$1" | tr ' ' '\n' | awk -F= -v k="$2" '$1 == k { print $2 }'
}

# Median of the numbers given as arguments.
median() {
  printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END {
    if (NR == 0) { print "nan"; exit }
    if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}

machine_note() {
  local fs
  fs=$(df -PT "$TMP" | awk 'NR == 2 { print $2 " on " $1 }')
  log "machine: $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg), data dir on $fs"
  if [[ "$fs" == tmpfs* ]]; then
    log "warning: $TMP is on tmpfs: fsync costs nothing there; set TMPDIR to a disk"
  fi
}
