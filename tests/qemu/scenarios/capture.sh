# Everything an inspector captures offline, then a restart: after SIGTERM and a fresh
# start the work order still holds every capture and the outbox every operation.
#
# With `fieldsync.broker=` (the host's broker, down until this scenario asks for it):
# then the link comes back and everything is delivered, and the back office refuses three
# changes, which the inspector fixes, discards and retries.

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

broker="$(arg broker)"
if [ -n "$broker" ]; then
    # Offline so far (the uplink kept trying): the host starts its broker on this line.
    report waiting-for-broker "$broker"
    await 60 "delivery of the offline captures" outbox_empty
    ctl status
    report status-delivered "$out"

    # The back office refuses a completed work naming a material it does not know; the
    # note after it on the same work order is held back, the other work order goes on.
    ctl add WO-7002 work --description "Replaced seal on V-12" --minutes 25 \
        --material "seal kit XL=1 pcs"
    report work "$out"
    work="$(echo "$out" | id_of)"
    ctl add WO-7002 note "V-12 tested at 6 bar, no leak"
    report held "$out"
    held="$(echo "$out" | id_of)"
    ctl add WO-7001 note "C1 bearing temperature back to normal"
    report other "$out"
    other="$(echo "$out" | id_of)"
    refused_and_other_delivered() { op_in "$work" refused && delivered "$other"; }
    await 60 "refusal of the unknown material" refused_and_other_delivered
    delivered "$held" && fail "the note after the refused work was not held back"
    ctl work-order WO-7002
    report wo-7002-refused-work "$out"

    # Fixed: the edit sends the same operation again with the new content.
    ctl edit "$work" work --description "Replaced seal on V-12" --minutes 25 \
        --material "seal kit V12=1 pcs"
    report edited "$out"
    await 60 "delivery of the fixed work" outbox_empty

    # A defect another inspector already reported: discarded. The move of WO-7001 to
    # on_site, refused once while the dispatcher held the work order: retried as it is.
    ctl add WO-7002 defect --title "Leaking seal on V-12" --severity medium
    report duplicate "$out"
    duplicate="$(echo "$out" | id_of)"
    ctl advance WO-7001 on_site
    report stage "$out"
    stage="$(echo "$out" | id_of)"
    both_refused() { op_in "$duplicate" refused && op_in "$stage" refused; }
    await 60 "refusal of the duplicate defect and the locked stage move" both_refused
    ctl work-order WO-7002
    report wo-7002-refused-defect "$out"
    ctl work-order WO-7001
    report wo-7001-refused-stage "$out"
    ctl discard "$duplicate"
    report discarded "$out"
    ctl retry "$stage"
    report retried "$out"
    await 60 "delivery of the retried stage move" outbox_empty

    ctl status
    report status-final "$out"
    ctl work-order WO-7001
    report wo-7001-final "$out"
    ctl work-order WO-7002
    report wo-7002-final "$out"
fi

stop_daemon
