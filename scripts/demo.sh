#!/usr/bin/env bash
# The whole path on this machine: a private Mosquitto broker, a demo back office and
# fieldsyncd, so that a record captured with fieldctl goes from "waiting" to "delivered".
#
#   scripts/demo.sh
#
# Installs what is missing (Debian; with sudo when not root), builds, then starts the
# three in the foreground: Mosquitto on a free port of 127.0.0.1 in a temporary folder,
# the demo back office (tests/src/bin/demo-backoffice.rs), which acknowledges everything
# and prints one line per operation and photo it receives, and fieldsyncd with
# daemon/config/demo.toml's settings plus an [uplink] to that broker. The daemon keeps
# its state in ./fieldsync-state, like the offline demo
# (target/debug/fieldsyncd --config daemon/config/demo.toml). Ctrl-C stops all three;
# what was captured stays for next time.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
repo="$PWD"
# Debian puts the broker in sbin, which a user's PATH leaves out.
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

device=demo-handheld
prefix=fieldsync/v1

scripts/install-deps.sh --demo
cargo build --locked -p fieldsyncd -p fieldsync-ui-bridge -p fieldsync-tests \
    --bin fieldsyncd --bin fieldctl --bin demo-backoffice
bin="$repo/target/debug"

run="$(mktemp -d "${TMPDIR:-/tmp}/fieldsync-demo.XXXXXX")"
broker_pid="" backoffice_pid="" daemon_pid=""

# Stops what runs, the daemon first so that it can say goodbye to the broker.
stop() {
    trap - EXIT INT TERM
    local pid
    for pid in "$daemon_pid" "$backoffice_pid" "$broker_pid"; do
        [ -n "$pid" ] || continue
        kill -TERM "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    rm -rf "$run"
}
trap stop EXIT
trap 'echo; echo "demo: stopping"; exit 0' INT TERM

fail() { # fail <message> [log file]
    echo "demo: $1" >&2
    if [ -n "${2:-}" ]; then tail -n 20 "$2" >&2; fi
    exit 1
}

listening() { (: <"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# Each program runs in its own session (setsid), so that Ctrl-C reaches this script
# only, and `stop` ends them in order.

# ---- the broker, on a free port -------------------------------------------------------
# A random port nothing listens on; should another program take it first, mosquitto
# fails to start and the next one is tried.
for _ in 1 2 3 4 5; do
    port=$((20000 + RANDOM % 40000))
    listening "$port" && continue
    cat >"$run/mosquitto.conf" <<EOF
listener $port 127.0.0.1
allow_anonymous true
persistence false
set_tcp_nodelay true
log_dest stderr
log_type error
log_type warning
log_type notice
EOF
    setsid mosquitto -c "$run/mosquitto.conf" 2>>"$run/mosquitto.log" &
    broker_pid=$!
    for _ in $(seq 50); do
        listening "$port" && break 2
        kill -0 "$broker_pid" 2>/dev/null || break
        sleep 0.1
    done
    kill "$broker_pid" 2>/dev/null || true
    wait "$broker_pid" 2>/dev/null || true
    broker_pid=""
done
[ -n "$broker_pid" ] || fail "mosquitto did not start:" "$run/mosquitto.log"
broker="mqtt://127.0.0.1:$port"

# ---- the demo back office ---------------------------------------------------------------
setsid "$bin/demo-backoffice" --broker "$broker" --topic-prefix "$prefix" --device-id "$device" \
    --work-orders daemon/config/demo-work-orders.json --attachments daemon/config/demo-attachments \
    --ready-file "$run/backoffice.ready" &
backoffice_pid=$!
until [ -e "$run/backoffice.ready" ]; do
    kill -0 "$backoffice_pid" 2>/dev/null || fail "the demo back office did not start"
    sleep 0.1
done

# ---- fieldsyncd ---------------------------------------------------------------------------
cat >"$run/fieldsyncd.toml" <<EOF
# daemon/config/demo.toml's settings, with a broker.
[store]
state_dir = "$repo/fieldsync-state"

[ui]
socket = "$repo/fieldsync-state/ui.sock"
socket_mode = "0600"

[log]
level = "info"
format = "text"

[dev]
seed_work_orders = "$repo/daemon/config/demo-work-orders.json"

[uplink]
broker = "$broker"
device_id = "$device"
topic_prefix = "$prefix"

[sync]
# The broker is on this machine's loopback: whatever NetworkManager says of the
# machine's own network, it can be reached.
network_manager = false
EOF
setsid "$bin/fieldsyncd" --config "$run/fieldsyncd.toml" 2>>"$run/fieldsyncd.log" &
daemon_pid=$!
until "$bin/fieldctl" --socket "$repo/fieldsync-state/ui.sock" status >/dev/null 2>&1; do
    kill -0 "$daemon_pid" 2>/dev/null || fail "fieldsyncd did not start:" "$run/fieldsyncd.log"
    sleep 0.1
done

# Something to attach: any file will do for the demo.
head -c 200000 /dev/urandom >"$run/photo.jpg"

cat <<HELP

The demo runs: Mosquitto on $broker, the demo back office (its
lines follow below) and fieldsyncd as device "$device". In another terminal:

  cd $repo
  target/debug/fieldctl work-orders
  target/debug/fieldctl add WO-1001 note "Gate locked, key with the caretaker"
  target/debug/fieldctl attach-photo <the item id printed by add> $run/photo.jpg
  target/debug/fieldctl work-order WO-1001    # each item: waiting, sending, delivered
  target/debug/fieldctl outbox                # what still waits for the back office
  target/debug/fieldctl status
  target/debug/fieldctl watch                 # events as they happen

Logs: $run/fieldsyncd.log and $run/mosquitto.log. Ctrl-C stops the demo.

HELP

# Runs until Ctrl-C, or until one of the three stops by itself.
set +e
wait -n "$broker_pid" "$backoffice_pid" "$daemon_pid"
set -e
for what in "broker:$broker_pid:mosquitto.log" "backoffice:$backoffice_pid:" \
    "daemon:$daemon_pid:fieldsyncd.log"; do
    IFS=: read -r name pid log <<<"$what"
    kill -0 "$pid" 2>/dev/null || fail "the $name stopped" "${log:+$run/$log}"
done
