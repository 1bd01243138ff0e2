# Helpers the scenarios share, sourced by /init.
#
# The serial console is the report. The host reads only whole lines that start with:
#   FIELDSYNC-REPORT <key> <value...>   a fact; the value is the rest of the line
#   FIELDSYNC-ACK <item id>             a capture fieldsyncd acknowledged as saved
#   FIELDSYNC-PHOTO <item id> <sha256>  a photo fieldsyncd acknowledged as saved
#   FIELDSYNC-LOG <line>                the daemon's log, when something went wrong
#   FIELDSYNC-FAIL <reason>             the scenario failed; the VM powers off
#   FIELDSYNC-DONE                      the scenario finished; the VM powers off

SOCKET=/run/fieldsync/ui.sock
CONFIG=/etc/fieldsync/fieldsyncd.toml
LOG=/run/fieldsyncd.log
daemon_pid=

report() { echo "FIELDSYNC-REPORT $*"; }

finish() {
    [ -z "$failed" ] && echo "FIELDSYNC-DONE"
    # A clean unmount, so that the host can read the disk without replaying its journal.
    [ -n "$daemon_pid" ] && kill -TERM "$daemon_pid" 2>/dev/null && wait "$daemon_pid"
    sync
    [ -n "$mounted" ] && umount /data
    poweroff -f
}

fail() {
    failed=1
    echo "FIELDSYNC-FAIL $*"
    [ -f "$LOG" ] && plain_log | sed 's/^/FIELDSYNC-LOG /'
    finish
}

# ctl ARGS...: fieldctl --json, its answer left in $out, or the scenario fails. It sets a
# variable rather than printing so that a failure is seen by this shell, not a subshell.
ctl() {
    out="$(fieldctl --socket "$SOCKET" --json "$@" 2>/tmp/ctl.err)" ||
        fail "fieldctl $1: $(cat /tmp/ctl.err)"
}

# The id of the item a `fieldctl --json` answer describes (it is the first key).
id_of() { sed -n 's/^{"id":"\([^"]*\)".*/\1/p'; }

start_daemon() {
    mkdir -p /run/fieldsync
    : >"$LOG"
    fieldsyncd --config "$CONFIG" >>"$LOG" 2>&1 &
    daemon_pid=$!
    n=0
    until grep -q 'fieldsyncd ready' "$LOG"; do
        kill -0 "$daemon_pid" 2>/dev/null || { daemon_pid=; fail "fieldsyncd exited before it was ready"; }
        n=$((n + 1))
        [ "$n" -le 600 ] || fail "fieldsyncd not ready in 30 s"
        sleep 0.05
    done
    # startup_ms=N: the daemon's own measure from start to ready.
    ready="$(plain_log | grep 'fieldsyncd ready' | tail -n 1)"
    report ready "pid=$daemon_pid" "$(echo "$ready" | grep -o 'startup_ms=[0-9]*')" \
        "$(echo "$ready" | grep -o 'unsent=[0-9]*')"
}

# The daemon's log without the terminal colours its text format may carry.
esc="$(printf '\033')"
plain_log() { sed "s/$esc\[[0-9;]*m//g" "$LOG"; }

stop_daemon() {
    kill -TERM "$daemon_pid"
    wait "$daemon_pid"
    code=$?
    daemon_pid=
    report stopped "exit=$code"
    [ "$code" -eq 0 ] || fail "fieldsyncd exited with $code after SIGTERM"
}

# A photo-like file of random bytes; prints its SHA-256.
make_photo() { # make_photo PATH KIB
    head -c "$(($2 * 1024))" /dev/urandom >"$1"
    sha256sum "$1" | cut -d' ' -f1
}

# Waiting on the uplink. The guest cannot sleep a fixed time and hope: emulation runs at
# the pace of a busy host, so every wait polls for what it waits for, up to a deadline.

now_s() { cut -d. -f1 /proc/uptime; }

# await SECONDS WHAT COMMAND...: runs COMMAND until it succeeds; fails the scenario
# with the daemon's log when SECONDS pass first.
await() {
    _secs=$1 _what=$2
    shift 2
    _until=$(($(now_s) + _secs))
    until "$@"; do
        [ "$(now_s)" -lt "$_until" ] || fail "no $_what within $_secs s; outbox: $out"
        sleep 0.2
    done
}

# Everything delivered: the back office acknowledged every operation.
outbox_empty() {
    ctl outbox
    [ "$out" = "[]" ]
}

# op_in ITEM STATE: ITEM's operation is in the outbox in STATE (waiting, in_progress,
# refused). An operation's JSON is flat, so its fields sit between its braces.
op_in() {
    ctl outbox
    echo "$out" | grep -q "\"item_id\":\"$1\"[^}]*\"state\":\"$2\""
}

# delivered ITEM: nothing of ITEM waits in the outbox any more.
delivered() {
    ctl outbox
    ! echo "$out" | grep -q "\"item_id\":\"$1\""
}
