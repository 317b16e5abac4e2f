#!/usr/bin/env bash
# Pass-through benchmark (DESIGN §7): wpf-gateway against nginx `proxy_pass`, both in front of
# the same upstream nginx serving a fixed 1 KiB body, with the upstream hit directly as the
# ceiling. Everything runs on 127.0.0.1 in a temp dir; nothing of the system nginx is used.
# See bench/README.md for what the figures mean.
set -euo pipefail
shopt -s inherit_errexit   # failures inside $(...) stop the script too

# --- knobs (environment) -----------------------------------------------------------------
ROUNDS=${ROUNDS:-3}                 # measured rounds per target (order reversed every other round)
DURATION=${DURATION:-10s}           # wrk -d per run
WARMUP=${WARMUP:-2s}                # one unmeasured wrk run per target first ("0" to skip)
CONNECTIONS=${CONNECTIONS:-64}      # wrk -c
THREADS=${THREADS:-2}               # wrk -t
WORKERS=${WORKERS:-2}               # nginx proxy worker_processes (the gateway uses all cores)
UPSTREAM_WORKERS=${UPSTREAM_WORKERS:-2}  # upstream nginx worker_processes
BODY_SIZE=${BODY_SIZE:-1024}        # response body bytes
# nginx-tls / gateway-tls: the HTTPS round (issue 4): the same proxies behind TLS, one shared
# self-signed ECDSA P-256 certificate, TLS 1.2/1.3, both with their default cipher order
# (wrk and both servers settle on TLS 1.3 AES-256-GCM), keep-alive connections.
TARGETS=${TARGETS:-"direct nginx gateway nginx-tls gateway-tls"}
STRICT=${STRICT:-0}                 # 1: exit 3 when the DESIGN §7 targets are missed
KEEP_TMP=${KEEP_TMP:-0}             # 1: keep the temp dir (configs, logs, wrk outputs)
GATEWAY_BIN=${GATEWAY_BIN:-}        # use this binary instead of building target/release
# baseline: another wpf-gateway binary (say, a build of an earlier commit) as one more target,
# plain HTTP, same config, measured in the same rounds; adds gateway/baseline ratios.
BASELINE_BIN=${BASELINE_BIN:-}

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TMP=""
PIDS=()                 # everything we started, for cleanup
declare -A SERVER_PID=() # target -> the pid whose CPU time is that target's (nginx: master)

log() { printf '[bench] %s\n' "$*" >&2; }
die() { printf '[bench] error: %s\n' "$*" >&2; exit 1; }

# --- cleanup -----------------------------------------------------------------------------
# Stop exactly the processes this script started (by pid), give them a moment, then force.
cleanup() {
    local rc=$? pid i
    trap - EXIT INT TERM
    for pid in "${PIDS[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        for ((i = 0; i < 50; i++)); do          # at most 5 s each
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    if [[ -n "$TMP" && -d "$TMP" ]]; then
        if [[ "$KEEP_TMP" == 1 ]]; then
            log "kept $TMP"
        else
            rm -rf "$TMP"
        fi
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- prerequisites -----------------------------------------------------------------------
# nginx and wrk come from Debian; apt-get update runs only when something is missing.
# Installing nginx does not start the system service here (policy-rc.d), and we never read
# or change /etc/nginx: every nginx below runs with its own prefix, config and pid file.
ensure_tools() {
    local missing=()
    command -v nginx >/dev/null || missing+=(nginx-light)
    command -v wrk >/dev/null || missing+=(wrk)
    command -v curl >/dev/null || missing+=(curl)
    command -v openssl >/dev/null || missing+=(openssl)
    ((${#missing[@]} == 0)) && return 0
    [[ $(id -u) == 0 ]] || die "need ${missing[*]}: install them (apt-get install ${missing[*]}) or run as root"
    log "installing ${missing[*]}"
    apt-get update -qq
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null; then
        # Newer Debian dropped the nginx flavours; plain `nginx` is the same server.
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
            "${missing[@]/nginx-light/nginx}" >/dev/null
    fi
}

# cargo only rebuilds when a source changed, so this is cheap when the binary is current.
ensure_gateway() {
    if [[ -n "$GATEWAY_BIN" ]]; then
        [[ -x "$GATEWAY_BIN" ]] || die "GATEWAY_BIN=$GATEWAY_BIN is not executable"
        return 0
    fi
    log "cargo build --release (no-op when up to date)"
    (cd "$REPO" && cargo build --release --quiet) || die "cargo build --release failed"
    GATEWAY_BIN="$REPO/target/release/wpf-gateway"
}

# Set variable $1 to a 127.0.0.1 port nobody listens on: random ports in 20000-32767, below
# Linux's ephemeral range (where wrk's and the proxies' own connections draw from), bounded tries.
# (Not run in $(...): USED_PORTS must survive so two targets never draw the same port. A race
# with another program is possible; the start-up checks below catch it.)
USED_PORTS=""
free_port() {
    local i p
    for ((i = 0; i < 100; i++)); do
        p=$((20000 + RANDOM % 12768))
        [[ " $USED_PORTS " == *" $p "* ]] && continue
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
            USED_PORTS+=" $p"
            printf -v "$1" '%s' "$p"
            return 0
        fi
    done
    die "no free port found"
}

# Wait (bounded) until URL answers 200 with a BODY_SIZE body; fail if PID died meanwhile.
wait_ready() {
    local name=$1 url=$2 pid=$3 logfile=$4 i code size
    for ((i = 0; i < 100; i++)); do            # at most ~10 s
        if ! kill -0 "$pid" 2>/dev/null; then
            tail -n 20 "$logfile" >&2 || true
            die "$name exited during start-up (log: $logfile)"
        fi
        if read -r code size < <(curl -sk -o /dev/null -w '%{http_code} %{size_download}\n' \
            --max-time 1 "$url" 2>/dev/null); then
            if [[ "$code" == 200 && "$size" == "$BODY_SIZE" ]]; then
                return 0
            fi
        fi
        sleep 0.1
    done
    tail -n 20 "$logfile" >&2 || true
    die "$name did not answer 200 with $BODY_SIZE bytes at $url (last: ${code:-none} ${size:-})"
}

# Common nginx settings: everything under the temp dir, no access log, keep-alive clients
# are never cut (nginx's default closes a connection after 1000 requests, the gateway does
# not; the comparison would otherwise charge nginx reconnects).
nginx_common() {
    local name=$1 workers=$2
    cat <<EOF
worker_processes $workers;
pid $TMP/$name.pid;
error_log $TMP/$name.error.log warn;
worker_rlimit_nofile $NOFILE;
events { worker_connections $((NOFILE / 2)); }
http {
    access_log off;
    client_body_temp_path $TMP/$name.tmp/body;
    proxy_temp_path $TMP/$name.tmp/proxy;
    fastcgi_temp_path $TMP/$name.tmp/fastcgi;
    uwsgi_temp_path $TMP/$name.tmp/uwsgi;
    scgi_temp_path $TMP/$name.tmp/scgi;
    keepalive_requests 100000000;
    keepalive_timeout 75s;
EOF
}

start_nginx() {
    local name=$1 conf="$TMP/$1.conf"
    mkdir -p "$TMP/$name.tmp"
    nginx -t -q -p "$TMP" -e "$TMP/$name.error.log" -c "$conf" -g 'daemon off;' \
        || die "$name: nginx config invalid ($conf)"
    # -e: the error log before the config is read (else /var/log/nginx); daemon off: the pid
    # we get is the master, which takes its workers down on TERM.
    nginx -p "$TMP" -e "$TMP/$name.error.log" -c "$conf" -g 'daemon off;' \
        >"$TMP/$name.out" 2>&1 &
    PIDS+=($!)
    LAST_PID=$!
}

# One certificate for both TLS targets, made fresh for each run (never committed).
make_cert() {
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
        -subj /CN=localhost -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" \
        -keyout "$TMP/tls.key" -out "$TMP/tls.pem" 2>/dev/null || die "openssl cannot make a certificate"
}

start_upstream() {
    local body
    body=$(head -c "$BODY_SIZE" /dev/zero | tr '\0' 'x')
    {
        nginx_common upstream "$UPSTREAM_WORKERS"
        cat <<EOF
    server {
        listen 127.0.0.1:$UPSTREAM_PORT reuseport backlog=4096;
        default_type text/plain;
        location / { return 200 "$body"; }
    }
}
EOF
    } >"$TMP/upstream.conf"
    start_nginx upstream
    SERVER_PID[direct]=$LAST_PID
    wait_ready upstream "http://127.0.0.1:$UPSTREAM_PORT/" "$LAST_PID" "$TMP/upstream.error.log"
}

# The peer of DESIGN §7: nginx proxy_pass with a keep-alive upstream pool, same worker count.
start_nginx_proxy() {
    {
        nginx_common nginx "$WORKERS"
        cat <<EOF
    upstream site {
        server 127.0.0.1:$UPSTREAM_PORT;
        keepalive 64;
        keepalive_requests 100000000;
    }
    server {
        listen 127.0.0.1:$NGINX_PORT reuseport backlog=4096;
        listen 127.0.0.1:$NGINX_TLS_PORT ssl reuseport backlog=4096;
        ssl_certificate $TMP/tls.pem;
        ssl_certificate_key $TMP/tls.key;
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_session_cache shared:bench:10m;
        location / {
            proxy_pass http://site;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host \$host;
            proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto \$scheme;
        }
    }
}
EOF
    } >"$TMP/nginx.conf"
    start_nginx nginx
    SERVER_PID[nginx]=$LAST_PID
    SERVER_PID[nginx-tls]=$LAST_PID
    wait_ready "nginx proxy" "http://127.0.0.1:$NGINX_PORT/" "$LAST_PID" "$TMP/nginx.error.log"
    wait_ready "nginx proxy (TLS)" "https://127.0.0.1:$NGINX_TLS_PORT/" "$LAST_PID" "$TMP/nginx.error.log"
}

start_gateway() {
    launch_gateway gateway "$GATEWAY_BIN" "$GATEWAY_PORT" "$GATEWAY_TLS_PORT"
    SERVER_PID[gateway]=$LAST_PID
    SERVER_PID[gateway-tls]=$LAST_PID
}

# The baseline binary, plain HTTP only, with the same site and log settings.
start_baseline() {
    launch_gateway baseline "$BASELINE_BIN" "$BASELINE_PORT"
    SERVER_PID[baseline]=$LAST_PID
}

# launch_gateway NAME BIN PORT [TLS_PORT]: config $TMP/NAME.toml (a TLS listener with the
# shared certificate when TLS_PORT is given), data in $TMP/NAME-data, log in $TMP/NAME.log;
# waits until it answers, checks the answer came through it; its pid in LAST_PID.
launch_gateway() {
    local name=$1 bin=$2 port=$3 tls_port=${4:-} tls=""
    mkdir -p "$TMP/$name-data"
    if [[ -n "$tls_port" ]]; then
        tls=$(printf '[tls]\nlisten = ["127.0.0.1:%s"]\n\n[[tls.cert]]\nchain = "%s"\nkey = "%s"\n' \
            "$tls_port" "$TMP/tls.pem" "$TMP/tls.key")
    fi
    cat >"$TMP/$name.toml" <<EOF
[server]
listen = ["127.0.0.1:$port"]
data_dir = "$TMP/$name-data"

$tls

[log]
level = "warn"
access_log = false

[[site]]
name = "bench"
upstream = "http://127.0.0.1:$UPSTREAM_PORT"
access_key = "bench-access-key-not-secret"
EOF
    "$bin" run --config "$TMP/$name.toml" >"$TMP/$name.log" 2>&1 &
    local pid=$!
    PIDS+=("$pid")
    LAST_PID=$pid
    # Not "$!" below: the process substitution in wait_ready resets it to curl's subshell,
    # and the TLS check then reported a gateway that runs fine as "exited during start-up".
    wait_ready "$name" "http://127.0.0.1:$port/" "$pid" "$TMP/$name.log"
    if [[ -n "$tls_port" ]]; then
        wait_ready "$name (TLS)" "https://127.0.0.1:$tls_port/" "$pid" "$TMP/$name.log"
    fi
    # Make sure the answer really went through the gateway (its Via), not something else.
    local head
    head=$(curl -s -D - -o /dev/null --max-time 2 "http://127.0.0.1:$port/")
    grep -qi '^via:.*wpf-gateway' <<<"$head" || die "$name answer carries no 'Via: ... wpf-gateway'"
}

url_of() {
    case $1 in
        direct) echo "http://127.0.0.1:$UPSTREAM_PORT/" ;;
        nginx) echo "http://127.0.0.1:$NGINX_PORT/" ;;
        gateway) echo "http://127.0.0.1:$GATEWAY_PORT/" ;;
        nginx-tls) echo "https://127.0.0.1:$NGINX_TLS_PORT/" ;;
        gateway-tls) echo "https://127.0.0.1:$GATEWAY_TLS_PORT/" ;;
        baseline) echo "http://127.0.0.1:$BASELINE_PORT/" ;;
        *) die "unknown target $1" ;;
    esac
}

# --- measuring ---------------------------------------------------------------------------
# wrk latency like "812.00us", "1.23ms", "2.01s" -> milliseconds.
to_ms() {
    awk -v v="$1" 'BEGIN {
        if (v ~ /us$/) { sub(/us$/, "", v); printf "%.3f", v / 1000 }
        else if (v ~ /ms$/) { sub(/ms$/, "", v); printf "%.3f", v }
        else if (v ~ /m$/) { sub(/m$/, "", v); printf "%.3f", v * 60000 }
        else if (v ~ /s$/) { sub(/s$/, "", v); printf "%.3f", v * 1000 }
        else { exit 1 }
    }'
}

# CPU time (user + system, clock ticks) used so far by a server: the process and its direct
# children (nginx's workers; the gateway is one process, its threads are counted in it).
cpu_ticks() {
    local pid p
    for p in "$1" $(pgrep -P "$1" || true); do
        # Fields after the "(comm)" field; utime and stime are the 14th and 15th overall.
        sed 's/^.*) //' "/proc/$p/stat" 2>/dev/null || true
    done | awk '{ t += $12 + $13 } END { print t + 0 }'
}

# CPU ticks of all servers, and of the finished children of the shell that runs this
# (wrk, once waited for, lands in that shell's cutime/cstime). Sets OUR_TICKS; not to be run
# in $(...), whose subshell would have children of its own.
our_ticks() {
    local t self me=$BASHPID   # expanded here: inside <(...) it would be that subshell's
    OUR_TICKS=0
    for t in "${!SERVER_PID[@]}"; do
        OUR_TICKS=$((OUR_TICKS + $(cpu_ticks "${SERVER_PID[$t]}")))
    done
    read -r -a self < <(sed 's/^.*) //' "/proc/$me/stat")
    OUR_TICKS=$((OUR_TICKS + self[13] + self[14]))   # cutime, cstime
}

# The machine's busy and total ticks (all cores) from /proc/stat: "BUSY TOTAL".
machine_ticks() {
    awk '$1 == "cpu" { idle = $5 + $6; for (i = 2; i <= 9; i++) total += $i
        print total - idle, total }' /proc/stat
}

# One wrk run; prints "REQS_PER_SEC P99_MS CPU_US_PER_REQUEST OTHERS_PCT". CPU per request is
# the target server's own (wrk and upstream excluded); OTHERS_PCT is the share of the
# machine's CPU that programs other than this benchmark took meanwhile (a noisy neighbour).
# Any non-2xx/3xx answer or socket error fails.
run_wrk() {
    local target=$1 duration=$2 out=$3 rps p99 requests before after ours0 ours1 m0 m1
    read -r -a m0 < <(machine_ticks)
    our_ticks
    ours0=$OUR_TICKS
    before=$(cpu_ticks "${SERVER_PID[$target]}")
    wrk -t"$THREADS" -c"$CONNECTIONS" -d"$duration" --latency "$(url_of "$target")" >"$out" 2>&1 \
        || { cat "$out" >&2; die "wrk failed against $target"; }
    after=$(cpu_ticks "${SERVER_PID[$target]}")
    our_ticks
    ours1=$OUR_TICKS
    read -r -a m1 < <(machine_ticks)
    if grep -q 'Non-2xx or 3xx responses' "$out"; then
        cat "$out" >&2
        die "$target served error responses ($(grep 'Non-2xx' "$out" | xargs))"
    fi
    if grep -q 'Socket errors' "$out"; then
        cat "$out" >&2
        die "$target had socket errors ($(grep 'Socket errors' "$out" | xargs))"
    fi
    rps=$(awk '/^Requests\/sec:/ { print $2 }' "$out")
    p99=$(awk '$1 == "99%" { print $2 }' "$out")
    requests=$(awk '/requests in/ { print $1 }' "$out")
    [[ -n "$rps" && -n "$p99" && "${requests:-0}" -gt 0 ]] \
        || { cat "$out" >&2; die "cannot parse wrk output for $target"; }
    echo "$rps $(to_ms "$p99") $(awk -v d=$((after - before)) -v n="$requests" -v hz="$CLK_TCK" \
        'BEGIN { printf "%.1f", d * 1e6 / hz / n }') $(awk -v busy=$((m1[0] - m0[0])) \
        -v ours=$((ours1 - ours0)) -v total=$((m1[1] - m0[1])) \
        'BEGIN { o = busy - ours; if (o < 0) o = 0; printf "%.0f", total ? 100 * o / total : 0 }')"
}

has_target() { [[ " $TARGETS " == *" $1 "* ]]; }

median() { tr ' ' '\n' | sort -g | awk '{ v[NR] = $1 } END {
    if (NR == 0) exit 1
    if (NR % 2) printf "%.3f", v[(NR + 1) / 2]; else printf "%.3f", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b == 0) print "n/a"; else printf "%.3f", a / b }'; }

main() {
    local t r res rps p99 cpu others
    [[ "$ROUNDS" =~ ^[1-9][0-9]*$ ]] || die "ROUNDS must be a positive integer"
    if [[ -n "$BASELINE_BIN" ]] && ! has_target baseline; then TARGETS="$TARGETS baseline"; fi
    for t in $TARGETS; do
        [[ "$t" =~ ^(direct|nginx|gateway|nginx-tls|gateway-tls|baseline)$ ]] || die "unknown target '$t' in TARGETS"
    done
    if has_target baseline; then
        [[ -x "$BASELINE_BIN" ]] || die "target baseline needs BASELINE_BIN, an executable wpf-gateway (got '$BASELINE_BIN')"
    fi
    ensure_tools
    if has_target gateway || has_target gateway-tls; then ensure_gateway; fi

    # wrk, nginx and the gateway each hold CONNECTIONS sockets or more (the proxies twice:
    # client side and upstream side). Raise the soft limit as far as the hard one allows.
    ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" || true
    NOFILE=$(ulimit -n)
    ((NOFILE >= 2 * CONNECTIONS + 64)) || die "ulimit -n is $NOFILE, too low for CONNECTIONS=$CONNECTIONS"
    CLK_TCK=$(getconf CLK_TCK)
    TMP=$(mktemp -d /tmp/wpf-bench.XXXXXX)
    free_port UPSTREAM_PORT
    free_port NGINX_PORT
    free_port GATEWAY_PORT
    free_port NGINX_TLS_PORT
    free_port GATEWAY_TLS_PORT
    free_port BASELINE_PORT

    make_cert
    start_upstream
    if has_target nginx || has_target nginx-tls; then start_nginx_proxy; fi
    if has_target gateway || has_target gateway-tls; then start_gateway; fi
    if has_target baseline; then start_baseline; fi
    log "upstream :$UPSTREAM_PORT$(has_target nginx && echo "  nginx proxy :$NGINX_PORT")$(has_target gateway && echo "  gateway :$GATEWAY_PORT")  (files in $TMP)"
    log "wrk -t$THREADS -c$CONNECTIONS -d$DURATION --latency, $ROUNDS rounds, targets: $TARGETS"
    log "$(nproc) cores; load average $(cut -d' ' -f1-3 /proc/loadavg) before the runs"

    declare -gA RPS=() P99=() CPU=()
    if [[ "$WARMUP" != 0 ]]; then
        # Fills keep-alive pools and caches so round 1 is not the odd one out.
        for t in $TARGETS; do
            run_wrk "$t" "$WARMUP" "$TMP/warmup-$t.txt" >/dev/null
        done
    fi

    # cpu us/req: CPU time of the target server itself (nginx master + workers, or the
    # gateway process) per request; unlike req/s it barely moves with other load on the box.
    # others %: how much of the machine other programs took during the run; a run with a
    # high figure measured the neighbours as much as the target.
    printf '\n%-6s %-11s %12s %10s %12s %9s\n' round target 'req/s' 'p99 ms' 'cpu us/req' 'others %'
    local forward reverse="" order
    forward=$TARGETS
    for t in $TARGETS; do reverse="$t $reverse"; done
    for ((r = 1; r <= ROUNDS; r++)); do
        # Alternate targets within each round so drift (other load on the box) hits all alike,
        # and reverse their order every other round, so that of two neighbours neither always
        # runs right after the other (whatever the one before left behind: sockets in
        # TIME_WAIT, a warm or cold cache).
        if ((r % 2)); then order=$forward; else order=$reverse; fi
        for t in $order; do
            res=$(run_wrk "$t" "$DURATION" "$TMP/round$r-$t.txt")
            read -r rps p99 cpu others <<<"$res"
            RPS[$t]+=" $rps"
            P99[$t]+=" $p99"
            CPU[$t]+=" $cpu"
            printf '%-6s %-11s %12.1f %10.3f %12.1f %9s\n' "$r" "$t" "$rps" "$p99" "$cpu" "$others"
        done
    done

    declare -gA MRPS=() MP99=() MCPU=()
    printf '\nmedians over %d rounds\n%-15s %12s %10s %12s\n' "$ROUNDS" target 'req/s' 'p99 ms' 'cpu us/req'
    for t in $TARGETS; do
        MRPS[$t]=$(median <<<"${RPS[$t]# }")
        MP99[$t]=$(median <<<"${P99[$t]# }")
        MCPU[$t]=$(median <<<"${CPU[$t]# }")
        printf '%-15s %12.1f %10.3f %12.1f\n' "$t" "${MRPS[$t]}" "${MP99[$t]}" "${MCPU[$t]}"
    done

    report_ratios
}

# Ratios of the medians. req/s: higher is better; p99: gateway's over the peer's, lower is
# better (1.0 = the same tail latency).
report_ratios() {
    local have_nginx=0 have_direct=0 rps_ratio="" p99_ratio="" verdict
    has_target gateway || has_target gateway-tls || return 0
    if has_target gateway && has_target nginx; then have_nginx=1; fi
    if has_target gateway && has_target direct; then have_direct=1; fi
    printf '\nratios of medians (req/s: higher is better, >= 1.0 = at least as fast;\n'
    printf '                   p99 and cpu/req: lower is better, <= 1.0 = no worse)\n'
    if ((have_nginx)); then
        rps_ratio=$(ratio "${MRPS[gateway]}" "${MRPS[nginx]}")
        p99_ratio=$(ratio "${MP99[gateway]}" "${MP99[nginx]}")
        printf '  gateway/nginx   req/s %s   p99 %s   cpu/req %s\n' "$rps_ratio" "$p99_ratio" \
            "$(ratio "${MCPU[gateway]}" "${MCPU[nginx]}")"
    fi
    if ((have_direct)); then
        printf '  gateway/direct  req/s %s   p99 %s\n' \
            "$(ratio "${MRPS[gateway]}" "${MRPS[direct]}")" "$(ratio "${MP99[gateway]}" "${MP99[direct]}")"
        if ((have_nginx)); then
            printf '  nginx/direct    req/s %s   p99 %s   (the peer, for scale)\n' \
                "$(ratio "${MRPS[nginx]}" "${MRPS[direct]}")" "$(ratio "${MP99[nginx]}" "${MP99[direct]}")"
        fi
    fi
    if has_target gateway && has_target baseline; then
        printf '  gateway/baseline  req/s %s   p99 %s   cpu/req %s   (this build against BASELINE_BIN)\n' \
            "$(ratio "${MRPS[gateway]}" "${MRPS[baseline]}")" \
            "$(ratio "${MP99[gateway]}" "${MP99[baseline]}")" \
            "$(ratio "${MCPU[gateway]}" "${MCPU[baseline]}")"
    fi
    if has_target gateway-tls && has_target nginx-tls; then
        printf '  HTTPS: gateway-tls/nginx-tls   req/s %s   p99 %s   cpu/req %s   (issue 4 target: req/s >= 1.0, p99 <= 1.0)\n' \
            "$(ratio "${MRPS[gateway-tls]}" "${MRPS[nginx-tls]}")" \
            "$(ratio "${MP99[gateway-tls]}" "${MP99[nginx-tls]}")" \
            "$(ratio "${MCPU[gateway-tls]}" "${MCPU[nginx-tls]}")"
    fi
    ((have_nginx)) || return 0
    if awk -v a="$rps_ratio" -v b="$p99_ratio" 'BEGIN { exit !(a >= 1.0 && b <= 1.0) }'; then
        verdict="met"
    else
        verdict="NOT met"
    fi
    printf 'DESIGN §7 target (gateway/nginx req/s >= 1.0 and p99 <= 1.0): %s\n' "$verdict"
    if [[ "$verdict" != met && "$STRICT" == 1 ]]; then
        exit 3
    fi
}

main "$@"
