# Captures notes, and now and then a photo, as fast as the UI can, until the host pulls
# the plug. Each ACK line is printed only after fieldctl had the daemon's answer. With
# `fieldsync.broker=` the daemon delivers as it captures, so the cut also lands between
# a send and its acknowledgement.

start_daemon
cycle="$(arg cycle)"
i=0
last=
while [ "$i" -lt 100000 ]; do
    i=$((i + 1))
    if [ $((i % 5)) -eq 0 ] && [ -n "$last" ]; then
        sha="$(make_photo /tmp/photo.jpg $((RANDOM % 60 + 4)))"
        ctl attach-photo "$last" /tmp/photo.jpg
        echo "FIELDSYNC-PHOTO $(echo "$out" | id_of) $sha"
        continue
    fi
    ctl add WO-7001 note "power cycle $cycle, capture $i: reading taken, gauge at $RANDOM kPa"
    last="$(echo "$out" | id_of)"
    echo "FIELDSYNC-ACK $last"
done
fail "the host never cut the power"
