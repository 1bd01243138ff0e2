# After a power cut: the ext4 journal was replayed by the mount above. First a copy of
# the database exactly as the cut left it (the host checks it with SQLite before the
# daemon recovers anything), then the daemon starts on it and lists what it holds.

rm -rf /data/after-cut
mkdir /data/after-cut
for f in /data/state/fieldsync.db /data/state/fieldsync.db-wal; do
    [ -f "$f" ] && cp "$f" /data/after-cut/
done
sync

start_daemon
ctl status
report status "$out"
ctl work-order WO-7001
report work-order "$out"
# Every photo file, hashed here so that a torn one shows.
for f in /data/state/photos/??/*; do
    [ -f "$f" ] && report photo-file "$(basename "$f") $(sha256sum "$f" | cut -d' ' -f1)"
done
# With the host's broker: whatever the cut left unsent, or sent and unacknowledged, goes
# now, and the host checks that the back office applied each capture once.
if [ -n "$(arg broker)" ]; then
    await 90 "delivery of everything after the cut" outbox_empty
    ctl status
    report status-drained "$out"
fi
stop_daemon
