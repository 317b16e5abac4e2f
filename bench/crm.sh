#!/usr/bin/env bash
# CRM-efficiency benchmark (DESIGN §7, issue 5): 5,000 `update` webhooks over 100 contacts,
# sent within 10 s, against the ActiveCampaign simulator at its real 5 req/s and 50 ms, with
# tags changed in the simulator during the flood. CRM requests per contact, processing rounds
# per contact, 429s, drain time against the floor 5 req/s sets, and every user's final tags.
# Each round is one run of examples/crm_bench.rs (simulator, gateway and flood in one process,
# loopback only, its own temp dir). See bench/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-3}
CONTACTS=${CONTACTS:-100}
WEBHOOKS=${WEBHOOKS:-5000}
SECONDS_FLOOD=${SECONDS_FLOOD:-10}
CONCURRENCY=${CONCURRENCY:-64}
DRAIN_LIMIT=${DRAIN_LIMIT:-600}    # seconds a round may wait for the drain, at most
MAX_DRAIN_RATIO=${MAX_DRAIN_RATIO:-1.5}
STRICT=${STRICT:-0}                # 1: exit 3 when a target is missed
BUILD=${BUILD:-1}
BENCH_BIN=${BENCH_BIN:-}
KEEP_OUT=${KEEP_OUT:-0}            # 1: keep every round's full output

log() { printf '%s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

[[ "$ROUNDS" =~ ^[1-9][0-9]*$ ]] || die "ROUNDS must be a positive whole number"
((ROUNDS <= 20)) || die "ROUNDS is at most 20 (each round takes about a minute)"

OUT=$(mktemp -d "${TMPDIR:-/tmp}/wpf-crm-bench.XXXXXX")
BENCH_PID=
cleanup() {
  if [[ -n "$BENCH_PID" ]] && kill -0 "$BENCH_PID" 2>/dev/null; then
    kill -TERM "$BENCH_PID" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$BENCH_PID" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$BENCH_PID" 2>/dev/null || true
  fi
  if [[ "$KEEP_OUT" == 1 ]]; then log "kept $OUT"; else rm -rf "$OUT"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

if [[ -z "$BENCH_BIN" && "$BUILD" == 1 ]]; then
  log "building (cargo build --release --example crm_bench) ..."
  cargo build --release --quiet --example crm_bench
fi
BENCH_BIN=${BENCH_BIN:-$PWD/target/release/examples/crm_bench}
[[ -x "$BENCH_BIN" ]] || die "no benchmark binary at $BENCH_BIN"

log "machine: $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg)"
log "$ROUNDS rounds: $WEBHOOKS update webhooks over $CONTACTS contacts in ${SECONDS_FLOOD} s," \
  "ActiveCampaign simulator at 5 req/s, 50 ms; gateway direct mode, [site.crm] rate = \"5/s\""

# A value from a `RESULT key=value ...` line: field FILE KEY
field() { grep '^RESULT ' "$1" | tr ' ' '\n' | awk -F= -v k="$2" '$1 == k { print $2 }'; }
median() {
  printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END {
    if (NR == 0) { print "nan"; exit }
    if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}

KEYS=(requests per_contact_mean rounds_max rounds_mean 429s drain_s floor_s ratio in_site_ratio mismatches)
declare -A VALUES
missed=0
printf '\n%-5s %8s %8s %8s %10s %11s %5s %8s %8s %7s %8s %10s\n' round answers requests \
  "req/ct" "rounds max" "rounds mean" 429s "drain s" "floor s" ratio "in-site" mismatches
for round in $(seq "$ROUNDS"); do
  out="$OUT/round-$round.txt"
  # Each round reports its own verdict (`met=`); the script decides on STRICT.
  "$BENCH_BIN" --contacts "$CONTACTS" --webhooks "$WEBHOOKS" --seconds "$SECONDS_FLOOD" \
    --concurrency "$CONCURRENCY" --drain-limit "$DRAIN_LIMIT" --seed "$round" \
    --max-drain-ratio "$MAX_DRAIN_RATIO" >"$out" 2>&1 &
  BENCH_PID=$!
  if ! wait "$BENCH_PID"; then
    BENCH_PID=
    cat "$out" >&2
    die "round $round failed (above)"
  fi
  BENCH_PID=
  grep -q '^RESULT ' "$out" || { cat "$out" >&2; die "round $round printed no RESULT line"; }
  answered=$(( $(field "$out" queued) + $(field "$out" coalesced) + $(field "$out" duplicate) ))
  for k in "${KEYS[@]}"; do VALUES[$k]+="$(field "$out" "$k") "; done
  [[ "$(field "$out" met)" == 1 ]] || missed=1
  printf '%-5s %8s %8s %8s %10s %11s %5s %8s %8s %7s %8s %10s\n' "$round" \
    "$answered" "$(field "$out" requests)" "$(field "$out" per_contact_mean)" \
    "$(field "$out" rounds_max)" "$(field "$out" rounds_mean)" "$(field "$out" 429s)" \
    "$(field "$out" drain_s)" "$(field "$out" floor_s)" "$(field "$out" ratio)" \
    "$(field "$out" in_site_ratio)" "$(field "$out" mismatches)"
  last_out=$out
done

declare -A MED
for k in "${KEYS[@]}"; do
  # shellcheck disable=SC2086
  MED[$k]=$(median ${VALUES[$k]})
done
printf '%-5s %8s %8s %8s %10s %11s %5s %8s %8s %7s %8s %10s\n' median "" "${MED[requests]}" \
  "${MED[per_contact_mean]}" "${MED[rounds_max]}" "${MED[rounds_mean]}" "${MED[429s]}" \
  "${MED[drain_s]}" "${MED[floor_s]}" "${MED[ratio]}" "${MED[in_site_ratio]}" "${MED[mismatches]}"

echo
echo "last round in full:"
grep -v '^RESULT ' "$last_out" | sed 's/^/  /'
echo
cat <<EOF
req/ct:   CRM requests naming a contact (GET /contacts/{id} and its /contactTags), mean per contact
rounds:   jobs done per contact (activity log 'done' rows); target max <= 2
429s:     rate-limit answers the simulator gave the gateway; target 0
drain:    first webhook sent -> every user's tags equal the simulator's
floor:    max((contacts x requests a round + tag names) / 5 req/s, last tag change + one round)
ratio:    drain / floor; target <= $MAX_DRAIN_RATIO ("close to the floor")
in-site:  CRM requests WP Fusion's own handler would make (webhooks x requests a load) / the gateway's
EOF
echo
if ((missed)); then
  echo "DESIGN §7 CRM target MISSED in at least one round (rounds > 2, a 429, a wrong user, or drain/floor > $MAX_DRAIN_RATIO)"
  [[ "$STRICT" == 1 ]] && exit 3
else
  echo "DESIGN §7 CRM target met in every round: <= 2 rounds per contact, 0 429s, every user correct, drain/floor <= $MAX_DRAIN_RATIO"
fi
exit 0
