#!/usr/bin/env bash
# WordPress benchmark (issue 6): 10,000 `update_tags` webhooks over 1,000 WordPress users,
# applied (a) by the gateway in direct mode, writing WP Fusion's meta in MariaDB itself, and
# (b) by real WordPress under `php -S`, the gateway relaying the flood to it (relay mode), with
# a minimal in-site handler that writes the same meta (bench/wordpress-handler.php).
# Optionally (c) `site`: the flood straight at WordPress, no gateway. Per target: the time
# until every user holds the tags of its newest webhook, and the CPU seconds spent by the
# gateway, by PHP and by MariaDB. Loopback only; everything runs in a temp dir and stops on
# exit. See bench/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-3}
WEBHOOKS=${WEBHOOKS:-10000}
USERS=${USERS:-1000}
TARGETS=${TARGETS:-direct relay}
CONNECTIONS=${CONNECTIONS:-64}      # the flood's connections to the gateway
PHP_WORKERS=${PHP_WORKERS:-2}       # PHP_CLI_SERVER_WORKERS of the site
UPSTREAM_CONCURRENCY=${UPSTREAM_CONCURRENCY:-$PHP_WORKERS}
WORKERS=${WORKERS:-4}               # the gateway's workers per site
DB_FLUSH=${DB_FLUSH:-1}             # innodb_flush_log_at_trx_commit (1: MariaDB's default)
APPLY_LIMIT=${APPLY_LIMIT:-900}     # seconds a target may take to apply everything, at most
WORDPRESS=${WORDPRESS:-/usr/share/wordpress}
SLUG=activecampaign

TMP=$(mktemp -d "${TMPDIR:-/tmp}/wpf-wordpress-bench.XXXXXX")
# shellcheck source=bench/pipeline-common.sh
source bench/pipeline-common.sh
# php -S's workers outlive their parent's TERM: stop them with it.
PHP_PID=
stop_php() {
  if [[ -n "$PHP_PID" ]]; then
    pkill -TERM -P "$PHP_PID" 2>/dev/null || true
    stop_pid "$PHP_PID"
    PHP_PID=
  fi
}
trap 'stop_php; cleanup' EXIT
trap 'exit 130' INT TERM

[[ "$ROUNDS" =~ ^[1-9][0-9]*$ ]] || die "ROUNDS must be a positive whole number"
[[ "$USERS" =~ ^[1-9][0-9]*$ && "$WEBHOOKS" =~ ^[1-9][0-9]*$ ]] || die "USERS and WEBHOOKS must be positive whole numbers"
((WEBHOOKS >= USERS)) || die "WEBHOOKS must be at least USERS (every user gets a webhook)"
for t in $TARGETS; do
  [[ "$t" == direct || "$t" == relay || "$t" == site ]] || die "unknown target $t (direct, relay, site)"
done

# MariaDB, WordPress and PHP from Debian, as .ci/run installs them; only what is missing.
missing=()
[[ -x /usr/sbin/mariadbd ]] || missing+=(mariadb-server)
[[ -f "$WORDPRESS/wp-settings.php" ]] || missing+=(wordpress)
command -v php >/dev/null || missing+=(php-cli)
php -r 'exit(function_exists("mysqli_connect") ? 0 : 1);' 2>/dev/null || missing+=(php-mysql)
command -v sqlite3 >/dev/null || missing+=(sqlite3)
command -v curl >/dev/null || missing+=(curl)
if ((${#missing[@]})); then
  [[ $(id -u) == 0 ]] || die "need ${missing[*]}: install them (apt-get install ${missing[*]}) or run as root"
  log "installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
build
machine_note
log "php: $(php -r 'echo PHP_VERSION, ", opcache ", function_exists("opcache_get_status") ? "loaded" : "absent";')," \
  "WordPress $(sed -n "s/^\$wp_version = '\(.*\)';/\1/p" "$WORDPRESS/wp-includes/version.php")," \
  "$(/usr/sbin/mariadbd --version | awk '{ print $3 }')"

# --- MariaDB: a private server in $TMP, root without password on 127.0.0.1 only -------------
me=$(id -un)
mariadb-install-db --no-defaults --datadir="$TMP/db" --user="$me" \
  --auth-root-authentication-method=normal --skip-test-db >"$TMP/db-install.log" 2>&1 ||
  { cat "$TMP/db-install.log" >&2; die "mariadb-install-db failed"; }
DB_PORT=$(free_port)
/usr/sbin/mariadbd --no-defaults --datadir="$TMP/db" --socket="$TMP/mysqld.sock" \
  --port="$DB_PORT" --bind-address=127.0.0.1 --user="$me" --skip-grant-tables --skip-log-bin \
  --log-error="$TMP/db-error.log" --innodb-buffer-pool-size=256M \
  --innodb-flush-log-at-trx-commit="$DB_FLUSH" --max-connections=300 >/dev/null 2>&1 &
DB_PID=$!
PIDS+=("$DB_PID")
wait_port "$DB_PORT" 60 "$DB_PID" || { cat "$TMP/db-error.log" >&2; die "MariaDB did not start"; }
sql() { mariadb --no-defaults -h127.0.0.1 -P"$DB_PORT" -uroot -N -B "$@"; }
log "MariaDB on 127.0.0.1:$DB_PORT, innodb_flush_log_at_trx_commit = $DB_FLUSH"

# CPU ticks of a process and its children (php -S forks its workers).
tree_ticks() {
  local total child
  total=$(proc_ticks "$1")
  for child in $(cat /proc/"$1"/task/*/children 2>/dev/null); do
    total=$((total + $(proc_ticks "$child")))
  done
  echo "$total"
}
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b - a }'; }
secs() { awk -v t="$1" 'BEGIN { printf "%.2f", t / 100 }'; }

# Users whose tags are those of their newest webhook. The load generator sends webhook i for
# contact 1 + i % USERS with the tags "bench, s<i>", so contact c's newest is
# i = c - 1 + USERS * floor((WEBHOOKS - c) / USERS), stored as PHP's serialize() writes it.
applied() {
  sql "$1" -e "
    SELECT COUNT(*) FROM (
      SELECT user_id, CONCAT('s', meta_value - 1 + $USERS * FLOOR(($WEBHOOKS - meta_value) / $USERS)) AS s
      FROM wp_usermeta WHERE meta_key = '${SLUG}_contact_id') e
    JOIN wp_usermeta t ON t.user_id = e.user_id AND t.meta_key = '${SLUG}_tags'
      AND t.meta_value = CONCAT('a:2:{i:0;s:5:\"bench\";i:1;s:', LENGTH(e.s), ':\"', e.s, '\";}')"
}

# wp.php (tests/it/wp.php filled in) for database $1 in directory $2, the site's URL
# http://127.0.0.1:$3, with the handler as a mu-plugin.
write_site() {
  local db=$1 dir=$2 port=$3
  mkdir -p "$dir/mu-plugins"
  cp bench/wordpress-handler.php "$dir/mu-plugins/"
  : >"$dir/handled.log"
  local constants="array( 'WPFGW_BENCH_KEY' => '$KEY', 'WPFGW_BENCH_LOG' => '$dir/handled.log', 'WPFGW_SLUG' => '$SLUG' )"
  sed -e "s|%DB%|$db|g" -e "s|%PORT%|$DB_PORT|g" -e "s|%HOME%|http://127.0.0.1:$port|g" \
    -e "s|%DIR%|$dir|g" -e "s|%WORDPRESS%|$WORDPRESS|g" -e "s|%SLUG%|$SLUG|g" \
    -e "s|%CONSTANTS%|$constants|g" tests/it/wp.php >"$dir/wp.php"
}

create_db() {
  sql -e "DROP DATABASE IF EXISTS $1; CREATE DATABASE $1 CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_520_ci"
}

# The template every run starts from: WordPress installed by wp_install(), then USERS users
# made by wp_insert_user (contact ids 1..USERS, tags "bench, s-init"). Made once (it takes
# a minute); each run gets a copy.
log "installing WordPress and $USERS users (once) ..."
create_db wpb_template
write_site wpb_template "$TMP/template" 9
php -d display_errors=stderr "$TMP/template/wp.php" install >/dev/null 2>"$TMP/template/install.err" ||
  { cat "$TMP/template/install.err" >&2; die "wp_install failed"; }
seeded=$(php -d display_errors=stderr "$TMP/template/wp.php" seed "$USERS" bench s-init 2>"$TMP/template/seed.err") ||
  { cat "$TMP/template/seed.err" >&2; die "seeding the users failed"; }
[[ "$seeded" == $((USERS + 1)) ]] || die "seeded $seeded users, expected $((USERS + 1)) with the admin"

# Database $1 as a copy of the template.
copy_template() {
  local copy="" t
  for t in $(sql -e "SELECT table_name FROM information_schema.tables WHERE table_schema = 'wpb_template'"); do
    copy+="CREATE TABLE $1.$t LIKE wpb_template.$t; INSERT INTO $1.$t SELECT * FROM wpb_template.$t; "
  done
  create_db "$1"
  sql -e "$copy"
}

# php -S serving the site in $1 on port $2 with PHP_WORKERS workers (opcache as installed).
start_php() {
  local dir=$1 port=$2
  PHP_CLI_SERVER_WORKERS=$PHP_WORKERS php -d display_errors=stderr -S "127.0.0.1:$port" \
    "$dir/wp.php" >"$dir/php.log" 2>&1 &
  PHP_PID=$!
  PIDS+=("$PHP_PID")
  wait_port "$port" 10 "$PHP_PID" || { cat "$dir/php.log" >&2; die "php -S did not start"; }
}

# Open jobs in the gateway's queue (pending or running), read alongside it (WAL).
open_jobs() {
  sqlite3 "file:$1/queue.sqlite3?mode=ro" \
    "SELECT COUNT(*) FROM jobs WHERE state IN ('pending', 'running')" 2>/dev/null || echo busy
}

# run_target TARGET ROUND: one measured run; writes one `RESULT` line to $TMP/result. (Not in
# a subshell: the processes it starts must stay in PIDS, and `die` must end the script.)
run_target() {
  local target=$1 round=$2
  local dir="$TMP/$target-$round" db="wpb_${target}_$round"
  local php_port gw_port
  php_port=$(free_port)
  copy_template "$db"
  write_site "$db" "$dir" "$php_port"
  PHP_PID=''
  GATEWAY_PID=''
  if [[ "$target" != direct ]]; then start_php "$dir" "$php_port"; fi
  local url
  if [[ "$target" == site ]]; then
    url="http://127.0.0.1:$php_port/"
  else
    gw_port=$(free_port)
    local mode=relay
    [[ "$target" == direct ]] && mode=direct
    gateway_config "$dir/gateway.toml" "$gw_port" "$dir/data" "$php_port" "$mode" \
      "workers = $WORKERS
upstream_concurrency = $UPSTREAM_CONCURRENCY"
    if [[ "$mode" == direct ]]; then
      cat >>"$dir/gateway.toml" <<EOF

[site.store]
kind = "wordpress"
url = "mysql://root@127.0.0.1:$DB_PORT/$db"
EOF
    fi
    start_gateway "$dir/gateway.toml" "$gw_port" "$dir/gateway.log"
    url="http://127.0.0.1:$gw_port/"
  fi
  local load_args=(--connections "$CONNECTIONS")
  # In-site, every webhook holds its connection until WordPress is done with it.
  [[ "$target" == site ]] && load_args=(--connections "$PHP_WORKERS" --timeout 60s --max-time "${APPLY_LIMIT}s")

  local gw0=0 php0=0 db0 t0 t_sent t_applied t_done
  [[ -n "$GATEWAY_PID" ]] && gw0=$(proc_ticks "$GATEWAY_PID")
  [[ -n "$PHP_PID" ]] && php0=$(tree_ticks "$PHP_PID")
  db0=$(proc_ticks "$DB_PID")
  t0=$(now)
  if ! "$LOAD_BIN" load --url "$url" --key "$KEY" --count "$WEBHOOKS" --contacts "$USERS" \
    "${load_args[@]}" >"$dir/load.out" 2>&1; then
    cat "$dir/load.out" >&2
    die "$target: the load generator reported failures (above)"
  fi
  t_sent=$(now)
  # Applied: every user holds its newest tags. Polled every 0.5 s: one poll costs MariaDB
  # ~20 ms of CPU (a join over every user's meta), the same in every target.
  local start=$SECONDS n
  while :; do
    n=$(applied "$db")
    [[ "$n" == "$USERS" ]] && break
    if ((SECONDS - start > APPLY_LIMIT)); then
      die "$target: after ${APPLY_LIMIT} s only $n of $USERS users hold their newest tags"
    fi
    [[ -z "$GATEWAY_PID" ]] || kill -0 "$GATEWAY_PID" 2>/dev/null || die "$target: the gateway exited"
    sleep 0.5
  done
  t_applied=$(now)
  # Done: the gateway's queue is empty too (a job may re-apply the same newest tags).
  if [[ -n "$GATEWAY_PID" ]]; then
    while [[ "$(open_jobs "$dir/data")" != 0 ]]; do
      ((SECONDS - start <= APPLY_LIMIT)) || die "$target: the queue did not drain"
      sleep 0.1
    done
  fi
  t_done=$(now)
  local gw1=0 php1=0 db1
  [[ -n "$GATEWAY_PID" ]] && gw1=$(proc_ticks "$GATEWAY_PID")
  [[ -n "$PHP_PID" ]] && php1=$(tree_ticks "$PHP_PID")
  db1=$(proc_ticks "$DB_PID")

  local php_requests tags_rows users_total jobs=0
  php_requests=$(wc -l <"$dir/handled.log")
  tags_rows=$(sql "$db" -e "SELECT COUNT(*) FROM wp_usermeta WHERE meta_key = '${SLUG}_tags'")
  users_total=$(sql "$db" -e "SELECT COUNT(*) FROM wp_users")
  ((tags_rows == USERS && users_total == USERS + 1)) ||
    die "$target: $users_total users and $tags_rows tag rows, expected $((USERS + 1)) and $USERS"
  if [[ -n "$GATEWAY_PID" ]]; then
    jobs=$(sqlite3 "file:$dir/data/queue.sqlite3?mode=ro" "SELECT COUNT(*) FROM jobs WHERE state = 'done'")
    local failed
    failed=$(sqlite3 "file:$dir/data/queue.sqlite3?mode=ro" "SELECT COUNT(*) FROM jobs WHERE state NOT IN ('done')")
    ((failed == 0)) || die "$target: $failed jobs did not end done"
    stop_pid "$GATEWAY_PID"
  else
    jobs=$php_requests
  fi
  stop_php
  sql -e "DROP DATABASE $db"

  echo "RESULT target=$target round=$round" \
    "admit_s=$(elapsed "$t0" "$t_sent") applied_s=$(elapsed "$t0" "$t_applied")" \
    "done_s=$(elapsed "$t0" "$t_done") jobs=$jobs php_requests=$php_requests" \
    "gateway_cpu_s=$(secs $((gw1 - gw0))) php_cpu_s=$(secs $((php1 - php0)))" \
    "db_cpu_s=$(secs $((db1 - db0)))" >"$TMP/result"
  rm -rf "$dir"
}

log "$ROUNDS rounds of: $WEBHOOKS update_tags webhooks over $USERS users on $CONNECTIONS connections;" \
  "targets $TARGETS; php -S with $PHP_WORKERS workers; gateway workers = $WORKERS," \
  "upstream_concurrency = $UPSTREAM_CONCURRENCY"
printf '\n%-5s %-7s %8s %10s %8s %7s %9s %8s %8s %8s\n' round target "admit s" "applied s" "done s" jobs \
  "php reqs" "gw cpu" "php cpu" "db cpu"
declare -A VAL
for round in $(seq "$ROUNDS"); do
  for target in $TARGETS; do
    run_target "$target" "$round"
    line=$(cat "$TMP/result")
    row=()
    for key in admit_s applied_s done_s jobs php_requests gateway_cpu_s php_cpu_s db_cpu_s; do
      v=$(printf '%s\n' "$line" | tr ' ' '\n' | awk -F= -v k="$key" '$1 == k { print $2 }')
      VAL[$target.$key]="${VAL[$target.$key]:-} $v"
      row+=("$v")
    done
    printf '%-5s %-7s %8s %10s %8s %7s %9s %8s %8s %8s\n' "$round" "$target" "${row[@]}"
  done
done

med() {
  # shellcheck disable=SC2086
  median ${VAL[$1.$2]}
}
echo
echo "medians over $ROUNDS rounds:"
printf '%-7s %10s %8s %7s %9s %8s %8s %8s\n' target "applied s" "done s" jobs "php reqs" "gw cpu" "php cpu" "db cpu"
for target in $TARGETS; do
  printf '%-7s %10s %8s %7s %9s %8s %8s %8s\n' "$target" "$(med "$target" applied_s)" \
    "$(med "$target" done_s)" "$(med "$target" jobs)" "$(med "$target" php_requests)" \
    "$(med "$target" gateway_cpu_s)" "$(med "$target" php_cpu_s)" "$(med "$target" db_cpu_s)"
done
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "inf" }'; }
if [[ " $TARGETS " == *" direct "* && " $TARGETS " == *" relay "* ]]; then
  echo
  echo "relay / direct, time until all applied:            $(ratio "$(med relay applied_s)" "$(med direct applied_s)")"
  echo "PHP CPU (relay) / gateway CPU (direct):            $(ratio "$(med relay php_cpu_s)" "$(med direct gateway_cpu_s)")"
  relay_total=$(awk -v a="$(med relay gateway_cpu_s)" -v b="$(med relay php_cpu_s)" -v c="$(med relay db_cpu_s)" 'BEGIN { print a + b + c }')
  direct_total=$(awk -v a="$(med direct gateway_cpu_s)" -v b="$(med direct php_cpu_s)" -v c="$(med direct db_cpu_s)" 'BEGIN { print a + b + c }')
  echo "all CPU (gateway + PHP + MariaDB), relay / direct: $(ratio "$relay_total" "$direct_total")"
fi
if [[ " $TARGETS " == *" site "* && " $TARGETS " == *" direct "* ]]; then
  echo "site / direct, time until all applied:             $(ratio "$(med site applied_s)" "$(med direct applied_s)")"
  echo "PHP CPU (site) / gateway CPU (direct):             $(ratio "$(med site php_cpu_s)" "$(med direct gateway_cpu_s)")"
fi
