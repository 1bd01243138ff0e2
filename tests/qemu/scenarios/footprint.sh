# The daemon at rest on a store the host filled: start to ready, cold (the first start
# after boot reads the database from the disk) and warm, and resident memory once idle.

rss() { # rss NAME: VmRSS, VmHWM, and VmRSS's anonymous and file parts, in KiB
    report "$1" "$(sed -n 's/^\(VmRSS\|VmHWM\|RssAnon\|RssFile\):[[:space:]]*\([0-9]*\) kB/\1=\2/p' \
        "/proc/$daemon_pid/status" | tr '\n' ' ')"
}

start_daemon
# Idle: nothing asks anything of it; whatever start-up did has settled.
sleep 3
rss memory-idle
ctl status
report status "$out"
stop_daemon

start_daemon
sleep 3
rss memory-idle-warm
stop_daemon
