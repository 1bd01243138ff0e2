#!/usr/bin/env bash
# Checks the units and their companions the way an image would hold them: sysusers and
# tmpfiles applied to a scratch root, `systemd-analyze verify` on the units there, and the
# sandbox's exposure held at or below MAX_EXPOSURE.
#
#   scripts/check-systemd.sh            # MAX_EXPOSURE=2.0 by default
#
# No running systemd is needed: every tool here works offline on a --root.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
units="$repo/systemd"
# In tenths, as `systemd-analyze security --threshold` counts.
max_exposure="${MAX_EXPOSURE:-2.0}"
threshold="$(awk -v x="$max_exposure" 'BEGIN { printf "%d", x * 10 + 0.5 }')"

die() { echo "check-systemd: $*" >&2; exit 1; }

# tmpfiles must chown into the scratch root to show the ownership the device gets.
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || die "run as root: tmpfiles needs to chown"
    exec sudo -n "$0" "$@"
fi

if ! command -v systemd-analyze >/dev/null; then
    echo "check-systemd: installing systemd for systemd-analyze" >&2
    env DEBIAN_FRONTEND=noninteractive apt-get update -q
    env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends systemd
fi

# --offline and --threshold arrived in systemd 250.
version="$(systemd-analyze --version | awk 'NR == 1 { print $2 }')"
[ "${version%%.*}" -ge 250 ] || die "systemd $version is too old: security --offline needs 250 or later"

root="$(mktemp -d)"
trap 'rm -rf "$root"' EXIT

# The targets and sockets our units name (sysinit.target, dbus.socket, ...) come from the
# host's unit directory; without them verify reports the dependencies as missing.
mkdir -p "$root/usr/lib/systemd" "$root/usr/bin" "$root/bin" "$root/etc"
cp -a /usr/lib/systemd/system "$root/usr/lib/systemd/"
# verify insists that every Exec*= program exists and is executable.
for exe in usr/bin/fieldsyncd usr/bin/fieldctl bin/kill; do
    printf '#!/bin/sh\nexit 0\n' >"$root/$exe"
    chmod 0755 "$root/$exe"
done

install -m 0644 "$units/fieldsyncd.service" "$units/fieldsyncd.socket" \
    "$root/usr/lib/systemd/system/"
install -d "$root/usr/lib/sysusers.d" "$root/usr/lib/tmpfiles.d"
install -m 0644 "$units/sysusers.d/fieldsync.conf" "$root/usr/lib/sysusers.d/"
install -m 0644 "$units/tmpfiles.d/fieldsync.conf" "$root/usr/lib/tmpfiles.d/"

echo "== sysusers"
: >"$root/etc/passwd"
: >"$root/etc/group"
systemd-sysusers --root="$root" fieldsync.conf
getent_root() { awk -F: -v n="$2" '$1 == n' "$root/etc/$1"; }
[ -n "$(getent_root passwd fieldsync)" ] || die "sysusers created no user fieldsync"
[ -n "$(getent_root group fieldsync-ui)" ] || die "sysusers created no group fieldsync-ui"

echo "== tmpfiles"
systemd-tmpfiles --root="$root" --create fieldsync.conf
uid="$(getent_root passwd fieldsync | cut -d: -f3)"
gid="$(getent_root group fieldsync | cut -d: -f3)"
expect_dir() {
    local got
    got="$(stat -c '%a %u %g' "$root$1")" || die "tmpfiles did not create $1"
    [ "$got" = "$2" ] || die "$1 is '$got', want '$2' (mode uid gid)"
    echo "$1: $got"
}
expect_dir /var/lib/fieldsync "750 $uid $gid"
expect_dir /var/lib/fieldsync/photos "750 $uid $gid"
expect_dir /etc/fieldsync/config.d "750 0 $gid"

echo "== verify"
# verify exits 0 on unknown keys and unparsable values and only prints them: any output
# at all is a failure here.
out="$(systemd-analyze verify --root="$root" fieldsyncd.service fieldsyncd.socket 2>&1)" \
    || { echo "$out" >&2; die "systemd-analyze verify failed"; }
[ -z "$out" ] || { echo "$out" >&2; die "systemd-analyze verify reported problems"; }
echo "fieldsyncd.service fieldsyncd.socket: clean"

echo "== security"
report="$(systemd-analyze security --offline=yes --root="$root" --threshold="$threshold" \
    fieldsyncd.service 2>&1)" && rc=0 || rc=$?
echo "$report" | grep -E '^✗' || true
exposure="$(echo "$report" | sed -n 's/.*Overall exposure level for fieldsyncd.service: \([0-9.]*\).*/\1/p')"
[ -n "$exposure" ] || { echo "$report" >&2; die "no exposure level in the report"; }
echo "exposure: $exposure (at most $max_exposure)"
[ "$rc" -eq 0 ] || die "exposure $exposure is above $max_exposure"
echo "check-systemd: ok"
