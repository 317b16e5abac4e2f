#!/usr/bin/env bash
# Admission benchmark (DESIGN §7): webhooks/s accepted durably (durability = "fsync"), answer
# time at a fixed rate, peak RSS through a flood, each against the pass-through of a trivial 200
# measured in the same run with the same load generator and connection count.
# See bench/PIPELINE.md for what each figure means and the knobs.
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-3}
CONNECTIONS=${CONNECTIONS:-64}
COUNT=${COUNT:-200000}            # webhooks (and GETs) per throughput run
WARMUP=${WARMUP:-5000}            # unmeasured requests before each throughput run
REPEAT=${REPEAT:-0.1}             # fraction of exact repeats in the second round
RATE=${RATE:-5000}                # open-loop rate of the latency run, per second
RATE_SECONDS=${RATE_SECONDS:-10}
RSS_COUNT=${RSS_COUNT:-1000000}
RSS_CONTACTS=${RSS_CONTACTS:-200000}
LOAD_THREADS=${LOAD_THREADS:-2}   # the load generator's runtime threads
STRICT=${STRICT:-0}               # 1: exit 3 when a DESIGN §7 target is missed
RUNS=${RUNS:-"pass distinct repeats rate rss"}

TMP=$(mktemp -d "${TMPDIR:-/tmp}/wpf-admission.XXXXXX")
# shellcheck source=bench/pipeline-common.sh
source bench/pipeline-common.sh
trap cleanup EXIT
trap 'exit 130' INT TERM

build
machine_note
command -v sqlite3 >/dev/null || log "note: sqlite3 not installed: the jobs-on-disk check is skipped"
if command -v dd >/dev/null; then
  # How fast this disk makes one small write durable (one fsync per write), for scale.
  dsync=$(dd if=/dev/zero of="$TMP/dsync.probe" bs=4k count=200 oflag=dsync 2>&1 |
    awk '/copied/ { for (i = 1; i <= NF; i++) if ($i ~ /^s,?$/) { print $(i - 1); exit } }')
  rm -f "$TMP/dsync.probe"
  [[ -n "$dsync" ]] && log "disk: 200 synchronous 4 KiB writes took ${dsync} s ($(awk -v s="$dsync" 'BEGIN { printf "%.0f", 200 / s }') fsyncs/s)"
fi

UP_PORT=$(free_port)
start_upstream "$UP_PORT" "$TMP/upstream.log" --threads 1 --body-size 1024
log "upstream: webhook_load upstream on 127.0.0.1:$UP_PORT (hyper, 1 thread, 1 KiB answers)"
log "rounds: $ROUNDS; connections: $CONNECTIONS; load generator threads: $LOAD_THREADS"
log ""

declare -A RES=()   # RES[run.key.round]=value

# measure RUN ROUND LOAD_ARGS...: fresh gateway on a fresh data dir, optional warm-up, the
# measured load, CPU and memory figures, a check of the jobs on disk.
measure() {
  local run=$1 round=$2
  shift 2
  local dir="$TMP/$run-$round" port
  mkdir -p "$dir"
  port=$(free_port)
  # paused: direct mode processes jobs now; a paused site queues them and runs none, so what
  # is measured is admission alone (no worker leases or finishes in the same writer).
  gateway_config "$dir/gateway.toml" "$port" "$dir/data" "$UP_PORT" direct "paused = true"
  start_gateway "$dir/gateway.toml" "$port" "$dir/gateway.log"
  local url="http://127.0.0.1:$port/"
  if [[ "$run" != rss && "$run" != rate && "$WARMUP" -gt 0 ]]; then
    local warm=(--count "$WARMUP" --connections "$CONNECTIONS" --threads "$LOAD_THREADS")
    [[ "$run" == pass ]] && warm+=(--get) || warm+=(--contact-base 900000000000)
    "$LOAD_BIN" load --url "$url" "${warm[@]}" >"$dir/warmup.out" 2>&1 ||
      { cat "$dir/warmup.out" >&2; die "$run warm-up failed"; }
  fi
  local m0 g0 u0 t0 m1 g1 u1 t1
  m0=$(machine_ticks) g0=$(proc_ticks "$GATEWAY_PID") u0=$(proc_ticks "$UPSTREAM_PID")
  t0=$(date +%s.%N)
  if ! "$LOAD_BIN" load --url "$url" --connections "$CONNECTIONS" --threads "$LOAD_THREADS" \
    --key "$KEY" "$@" >"$dir/load.out" 2>&1; then
    cat "$dir/load.out" >&2
    die "$run round $round: the load generator reported failures (above)"
  fi
  t1=$(date +%s.%N)
  m1=$(machine_ticks) g1=$(proc_ticks "$GATEWAY_PID") u1=$(proc_ticks "$UPSTREAM_PID")
  local answered req_s gen_cpu
  answered=$(result_field "$dir/load.out" answered)
  req_s=$(result_field "$dir/load.out" req_s)
  gen_cpu=$(result_field "$dir/load.out" cpu_s)
  RES[$run.req_s.$round]=$req_s
  RES[$run.p50.$round]=$(result_field "$dir/load.out" p50_ms)
  RES[$run.p99.$round]=$(result_field "$dir/load.out" p99_ms)
  RES[$run.max.$round]=$(result_field "$dir/load.out" max_ms)
  RES[$run.hwm.$round]=$(proc_kib "$GATEWAY_PID" VmHWM)
  RES[$run.rss.$round]=$(proc_kib "$GATEWAY_PID" VmRSS)
  RES[$run.gwcpu.$round]=$(awk -v a="$g0" -v b="$g1" -v n="$answered" 'BEGIN { printf "%.1f", (b - a) * 10000 / n }')
  # Share of the whole machine that programs other than this benchmark took meanwhile.
  RES[$run.others.$round]=$(awk -v m0="$m0" -v m1="$m1" -v g="$((g1 - g0))" -v u="$((u1 - u0))" \
    -v gen="$gen_cpu" -v t0="$t0" -v t1="$t1" -v n="$(nproc)" 'BEGIN {
      o = (m1 - m0) - g - u - gen * 100; if (o < 0) o = 0
      printf "%.0f", o / ((t1 - t0) * 100 * n) * 100 }')
  local status
  status=$(result_field "$dir/load.out" status)
  printf 'round %s  %-9s %8.0f req/s  p50 %7.3f ms  p99 %7.3f ms  max %8.3f ms  gateway %6.1f us/req  VmHWM %4d MiB  others %3s%%  [%s]\n' \
    "$round" "$run" "$req_s" "${RES[$run.p50.$round]}" "${RES[$run.p99.$round]}" "${RES[$run.max.$round]}" \
    "${RES[$run.gwcpu.$round]}" "$((RES[$run.hwm.$round] / 1024))" "${RES[$run.others.$round]}" "$status"
  if [[ "$run" == rate ]]; then
    local late
    late=$(result_field "$dir/load.out" late)
    [[ "$late" == 0 ]] || log "         $late requests of the rate run found all $CONNECTIONS connections busy (timed from their slot)"
  fi
  stop_pid "$GATEWAY_PID"
  # Every 202 is a delivery on disk: a new job (deliveries 1) or merged into one.
  if [[ "$run" != pass ]] && command -v sqlite3 >/dev/null; then
    local on_disk accepted
    # Warm-up webhooks went to contacts from 900000000000 on; they are not counted.
    on_disk=$(sqlite3 "$dir/data/queue.sqlite3" \
      "SELECT COALESCE(SUM(deliveries), 0) FROM jobs WHERE CAST(contact AS INTEGER) < 900000000000")
    accepted=$(tr ',' '\n' <<<"$status" | awk -F: '$1 == 202 { print $2 }')
    [[ "$on_disk" == "${accepted:-0}" ]] ||
      die "$run round $round: $accepted webhooks answered 202 but $on_disk deliveries are on disk"
  fi
  rm -rf "$dir/data"
}

for round in $(seq "$ROUNDS"); do
  for run in $RUNS; do
    case $run in
      pass) measure pass "$round" --get --count "$COUNT" ;;
      distinct) measure distinct "$round" --count "$COUNT" --contact-base $((round * 10000000)) ;;
      repeats) measure repeats "$round" --count "$COUNT" --repeat "$REPEAT" --contact-base $((round * 10000000)) ;;
      rate) measure rate "$round" --rate "$RATE" --duration "${RATE_SECONDS}s" ;;
      rss) measure rss "$round" --count "$RSS_COUNT" --contacts "$RSS_CONTACTS" ;;
      *) die "unknown run $run (RUNS: pass distinct repeats rate rss)" ;;
    esac
  done
done

med() { # med RUN KEY
  local vals=() r
  for r in $(seq "$ROUNDS"); do vals+=("${RES[$1.$2.$r]}"); done
  median "${vals[@]}"
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b == 0) print "nan"; else printf "%.2f", a / b }'; }

echo
echo "medians over $ROUNDS rounds (load average now $(cut -d' ' -f1-3 /proc/loadavg)):"
for run in $RUNS; do
  printf '  %-9s %8.0f req/s  p50 %7.3f ms  p99 %7.3f ms  gateway %6.1f us/req  VmHWM %4.0f MiB  others %3s%%\n' \
    "$run" "$(med "$run" req_s)" "$(med "$run" p50)" "$(med "$run" p99)" "$(med "$run" gwcpu)" \
    "$(awk -v k="$(med "$run" hwm)" 'BEGIN { print k / 1024 }')" "$(med "$run" others)"
done
echo
missed=0
has() { [[ " $RUNS " == *" $1 "* ]]; }
if has pass; then
  pass=$(med pass req_s)
  echo "ratios to the pass-through of a trivial 200 (same generator, $CONNECTIONS connections):"
  for run in distinct repeats rss; do
    has "$run" && printf '  %-9s / pass-through req/s  %s   cpu/req %s\n' "$run" \
      "$(ratio "$(med "$run" req_s)" "$pass")" "$(ratio "$(med "$run" gwcpu)" "$(med pass gwcpu)")"
  done
  echo
fi
echo "DESIGN §7 targets:"
check() { # check LABEL VALUE OP LIMIT UNIT
  local ok
  ok=$(awk -v v="$2" -v l="$4" -v op="$3" 'BEGIN { print (op == ">=" ? v >= l : v <= l) ? "met" : "MISSED" }')
  [[ "$ok" == met ]] || missed=1
  printf '  %-44s %10s %s (target %s %s)  %s\n' "$1" "$2" "$5" "$3" "$4" "$ok"
}
has distinct && check "admission, distinct contacts, fsync" "$(med distinct req_s)" ">=" 20000 "req/s"
has repeats && check "admission, ${REPEAT} exact repeats, fsync" "$(med repeats req_s)" ">=" 20000 "req/s"
has rate && check "p99 answer at ${RATE}/s open loop" "$(med rate p99)" "<=" 10 "ms"
has rss && check "VmHWM after $RSS_COUNT over $RSS_CONTACTS contacts" \
  "$(awk -v k="$(med rss hwm)" 'BEGIN { printf "%.0f", k / 1024 }')" "<=" 150 "MiB"
if [[ "$missed" == 1 && "$STRICT" == 1 ]]; then exit 3; fi
