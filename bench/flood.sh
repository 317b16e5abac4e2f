#!/usr/bin/env bash
# Flood benchmark (issue 3): a burst of webhooks over few contacts in relay mode into a slow
# site. How many requests the site gets per contact, how long the queue takes to drain against
# the floor the site's pace sets, and that nothing is lost (every contact reaches the site, with
# the newest tags sent for it). See bench/PIPELINE.md.
set -euo pipefail
cd "$(dirname "$0")/.."

WEBHOOKS=${WEBHOOKS:-10000}
CONTACTS=${CONTACTS:-1000}
DELAY_MS=${DELAY_MS:-200}          # the site's time per webhook
WORKERS=${WORKERS:-4}
UPSTREAM_CONCURRENCY=${UPSTREAM_CONCURRENCY:-2}
CONNECTIONS=${CONNECTIONS:-64}
DRAIN_LIMIT=${DRAIN_LIMIT:-900}    # seconds to wait for the queue to drain, at most
STRICT=${STRICT:-0}                # 1: exit 3 when a target is missed

TMP=$(mktemp -d "${TMPDIR:-/tmp}/wpf-flood.XXXXXX")
# shellcheck source=bench/pipeline-common.sh
source bench/pipeline-common.sh
trap cleanup EXIT
trap 'exit 130' INT TERM

command -v sqlite3 >/dev/null || die "sqlite3 is needed to see when the queue is drained (apt-get install sqlite3)"
command -v python3 >/dev/null || die "python3 is needed for the analysis"
build
machine_note

UP_PORT=$(free_port)
start_upstream "$UP_PORT" "$TMP/upstream.log" --threads 1 --delay "${DELAY_MS}ms" --record "$TMP/seen.tsv"
PORT=$(free_port)
gateway_config "$TMP/gateway.toml" "$PORT" "$TMP/data" "$UP_PORT" relay \
  "workers = $WORKERS
upstream_concurrency = $UPSTREAM_CONCURRENCY"
start_gateway "$TMP/gateway.toml" "$PORT" "$TMP/gateway.log"
log "site: webhook_load upstream on 127.0.0.1:$UP_PORT, ${DELAY_MS} ms per request"
log "gateway: relay mode, workers = $WORKERS, upstream_concurrency = $UPSTREAM_CONCURRENCY, durability = fsync"
log "sending $WEBHOOKS webhooks over $CONTACTS contacts on $CONNECTIONS connections ..."

if ! "$LOAD_BIN" load --url "http://127.0.0.1:$PORT/" --key "$KEY" --connections "$CONNECTIONS" \
  --count "$WEBHOOKS" --contacts "$CONTACTS" --sent-log "$TMP/sent.tsv" >"$TMP/load.out" 2>&1; then
  cat "$TMP/load.out" >&2
  die "the load generator reported failures (above)"
fi
grep -E '^(answered|status|latency)' "$TMP/load.out" | sed 's/^/  /'

# Drained: no job pending or running in the queue file (read alongside the gateway, WAL).
open_jobs() {
  sqlite3 "file:$TMP/data/queue.sqlite3?mode=ro" \
    "SELECT COUNT(*) FROM jobs WHERE state IN ('pending', 'running')" 2>/dev/null || echo busy
}
log "waiting for the queue to drain (at most ${DRAIN_LIMIT} s) ..."
start=$SECONDS
while :; do
  left=$(open_jobs)
  [[ "$left" == 0 ]] && break
  kill -0 "$GATEWAY_PID" 2>/dev/null || die "the gateway exited (log: $(tail -5 "$TMP/gateway.log"))"
  if ((SECONDS - start > DRAIN_LIMIT)); then
    die "queue not drained after ${DRAIN_LIMIT} s: $left jobs open"
  fi
  if (((SECONDS - start) % 20 == 0)); then
    log "  $((SECONDS - start)) s: $left jobs open, $(wc -l <"$TMP/seen.tsv") upstream requests done"
  fi
  sleep 1
done
states=$(sqlite3 "file:$TMP/data/queue.sqlite3?mode=ro" \
  "SELECT state || ':' || COUNT(*) FROM jobs GROUP BY state ORDER BY state" | paste -sd' ')
log "drained; jobs by state: $states"
stop_pid "$GATEWAY_PID"
stop_pid "$UPSTREAM_PID"

python3 - "$TMP/sent.tsv" "$TMP/seen.tsv" "$DELAY_MS" "$UPSTREAM_CONCURRENCY" "$STRICT" <<'EOF'
import sys
from collections import defaultdict

sent_path, seen_path, delay_ms, concurrency, strict = sys.argv[1:6]
delay_s, concurrency = int(delay_ms) / 1000, int(concurrency)

sent = defaultdict(list)          # contact -> [(start_us, end_us, tags)]
first_sent = None
n_sent = 0
for line in open(sent_path):
    i, contact, seq, start, end, status = line.split("\t")
    start, end = int(start), int(end)
    sent[contact].append((start, end, f"bench, s{seq}"))
    first_sent = start if first_sent is None else min(first_sent, start)
    n_sent += 1

seen = defaultdict(list)          # contact -> [(done_us, tags)]
jobs = defaultdict(int)
n_req, last_done, max_in_flight = 0, 0, 0
for line in open(seen_path):
    done, in_flight, job, contact, tags, action = line.rstrip("\n").split("\t")
    seen[contact].append((int(done), tags))
    jobs[job] += 1
    n_req += 1
    last_done = max(last_done, int(done))
    max_in_flight = max(max_in_flight, int(in_flight))

problems = []
missing = [c for c in sent if c not in seen]
if missing:
    problems.append(f"{len(missing)} contacts never reached the site, e.g. {missing[:5]}")
stale = []
for contact, deliveries in sent.items():
    if contact not in seen:
        continue
    newest = max(deliveries)
    # A delivery still in flight when the newest one was sent may have reached the gateway
    # after it: either one is "the newest" then.
    acceptable = {t for (s, e, t) in deliveries if e >= newest[0]} | {newest[2]}
    last = max(seen[contact])[1]
    if last not in acceptable:
        stale.append((contact, last, sorted(acceptable)))
if stale:
    problems.append(f"{len(stale)} contacts' last relayed tags are not the newest sent, e.g. {stale[:3]}")
extra = [c for c in seen if c not in sent]
if extra:
    problems.append(f"{len(extra)} contacts reached the site that were never sent: {extra[:5]}")

per_contact = [len(v) for v in seen.values()]
max_per, mean_per = max(per_contact, default=0), (sum(per_contact) / len(per_contact) if per_contact else 0)
retried = sum(1 for n in jobs.values() if n > 1)
drain = (last_done - first_sent) / 1e6
floor = n_req * delay_s / concurrency

print()
print(f"webhooks sent           {n_sent} over {len(sent)} contacts")
print(f"upstream requests       {n_req} (jobs relayed: {len(jobs)}, relayed more than once: {retried}); "
      f"at most {max_in_flight} at once")
print(f"requests per contact    max {max_per}, mean {mean_per:.3f}   (target: max <= 2)")
print(f"drain time              {drain:.1f} s, first webhook sent -> last upstream request done")
print(f"floor                   {floor:.1f} s = {n_req} requests x {delay_s * 1000:.0f} ms / {concurrency}")
print(f"nothing lost            {'yes' if not missing and not stale else 'NO'}: "
      f"{len(sent) - len(missing)}/{len(sent)} contacts reached the site, "
      f"{len(sent) - len(missing) - len(stale)} with the newest tags sent")
print()
print(f"ratio upstream requests / webhooks sent   {n_req / n_sent:.4f}  "
      f"(the site was spared {100 * (1 - n_req / n_sent):.1f}% of the work)")
print(f"ratio drain time / floor                  {drain / floor:.3f}")
if max_in_flight > concurrency:
    problems.append(f"{max_in_flight} requests at once at the site, above upstream_concurrency {concurrency}")
for p in problems:
    print("PROBLEM", p)
if problems:
    sys.exit(1)
if max_per > 2:
    print("target MISSED: a contact reached the site more than twice")
    sys.exit(3 if strict == "1" else 0)
print("target met: every contact at most twice, nothing lost")
EOF
