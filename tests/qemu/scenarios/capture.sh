# Everything an inspector captures offline, then a restart: after SIGTERM and a fresh
# start the work order still holds every capture and the outbox every operation.

start_daemon

ctl add WO-7001 note "Compressor C1 bearing warm to the touch"
report item "$out"
note="$(echo "$out" | id_of)"

ctl add WO-7001 defect --title "Cracked flange on discharge line" --severity high \
    --description "Hairline crack, no leak yet" --location "C1 discharge"
report item "$out"
defect="$(echo "$out" | id_of)"

ctl add WO-7001 work --description "Replaced flange gasket" --minutes 40 \
    --material "gasket DN100=2 pcs" --material "bolt M16=8 pcs"
report item "$out"

ctl add WO-7001 checklist valves=true vibration=4.2 "remarks=bearing temperature noted"
report item "$out"

sha="$(make_photo /tmp/flange.jpg 300)"
report photo-sha256 "$sha"
ctl attach-photo "$defect" /tmp/flange.jpg --caption "crack"
report item "$out"

ctl advance WO-7001 accepted
report item "$out"

ctl status
report status-before "$out"

stop_daemon
start_daemon

ctl status
report status-after "$out"
ctl work-order WO-7001
report work-order-after "$out"
ctl outbox
report outbox-after "$out"
# The photo's file itself, as the next boot would find it.
dir="$(echo "$sha" | cut -c1-2)"
report photo-file "$(sha256sum "/data/state/photos/$dir/$sha" | cut -d' ' -f1)"
report note-id "$note"

stop_daemon

# The user network the uplink will use: the host's loopback is 10.0.2.2 from here.
port="$(arg probe_port)"
if [ -n "$port" ]; then
    echo "fieldsync guest $(uname -m)" | nc -w 10 10.0.2.2 "$port" || fail "no connection to the host"
    report network "sent"
fi
