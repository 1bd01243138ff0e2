#!/usr/bin/env bash
# Installs what building and testing fieldsync need on Debian (12 "bookworm" or later),
# only what is missing. Safe to run again.
#
#   scripts/install-deps.sh          # everything the build and the test suite need
#   scripts/install-deps.sh --demo   # only what scripts/demo.sh needs: the build, mosquitto
set -euo pipefail
# Debian puts the broker in sbin, which a user's PATH leaves out.
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

demo_only=0
case "${1:-}" in
    "") ;;
    --demo) demo_only=1 ;;
    *) echo "install-deps: unknown argument $1" >&2; exit 2 ;;
esac

as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif ! command -v sudo >/dev/null 2>&1; then
        echo "install-deps: installing packages needs root, and sudo is not installed: run this as root once (apt-get install sudo, or su -c \"$0\")" >&2
        exit 1
    elif [ -t 0 ]; then
        # At a terminal sudo may ask for the password.
        sudo "$@"
    else
        sudo -n "$@" || {
            echo "install-deps: sudo needs a password and there is no terminal to ask on: run this once at a terminal, or as root" >&2
            exit 1
        }
    fi
}

missing=()
need() { # need <command> <debian package>
    command -v "$1" >/dev/null 2>&1 || missing+=("$2")
}

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }
older_than() { [ "$(printf '%s\n' "$2" "$1" | sort -V | head -n1)" != "$2" ]; }
rust_needed=1.89.0

# A Rust toolchain: rustup's when present, else Debian's rustc-web/cargo-web (1.89+ is
# needed; Debian 12 has it from bookworm-security, Debian 13 from its stable updates).
# The checks run rustfmt and clippy.
if command -v rustup >/dev/null 2>&1; then
    for component in rustfmt clippy; do
        rustup component list --installed 2>/dev/null | grep -q "^$component" ||
            rustup component add "$component"
    done
else
    # Debian's plain rustc (1.63 on Debian 12, 1.85 on 13) is too old; rustc-web takes
    # its place.
    if old=$(rustc --version 2>/dev/null | awk '{print $2}') && older_than "$old" "$rust_needed"; then
        echo "install-deps: rustc $old is older than $rust_needed: replacing it with Debian's rustc-web" >&2
        missing+=(rustc-web cargo-web)
    else
        need cargo cargo-web
        need rustc rustc-web
    fi
    need rustfmt rustfmt-web
    need cargo-clippy rust-web-clippy
fi
# crates.io is reached over TLS; minimal images ship without the CA bundle.
[ -s /etc/ssl/certs/ca-certificates.crt ] || missing+=(ca-certificates)
need cc gcc
# gcc only recommends the C library's headers, and the bundled SQLite and zstd need them.
installed libc6-dev || missing+=(libc6-dev)
need pkg-config pkg-config
# The uplink's tests and the demo run a real broker.
need mosquitto mosquitto
if [ "$demo_only" -eq 0 ]; then
    # Tests: mount/umount for the full-disk test, systemd-analyze for the unit checks,
    # systemd-socket-activate to pass the UI socket as fieldsyncd.socket does,
    # mosquitto_pub as the benchmarks' reference, openssl for the TLS tests' certificates,
    # python3-venv for the Yocto lint.
    need mount mount
    need systemd-analyze systemd
    need systemd-socket-activate systemd
    need mosquitto_pub mosquitto-clients
    need openssl openssl
    # The expiry's tests set the daemon's wall clock as NTP would, under libfaketime.
    need faketime faketime
    /usr/bin/python3 -c 'import ensurepip, venv' 2>/dev/null || missing+=(python3-venv)
    # The link watcher's tests: a private dbus-daemon with NetworkManager and ModemManager
    # played by python-dbusmock under Debian's own Python (tests/src/netmock.rs).
    need dbus-daemon dbus-daemon
    /usr/bin/python3 -c 'import dbusmock' 2>/dev/null || missing+=(python3-dbusmock)
    # The uplink's tests also run against a second broker, Aedes, under Node.js
    # (tests/aedes/); Debian's Node.js 18 is enough.
    need node nodejs
    need npm npm
fi

if [ "${#missing[@]}" -gt 0 ]; then
    echo "install-deps: installing ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    # A mirror index briefly out of step with its files fails the first update.
    as_root apt-get update -q || { sleep 5; as_root apt-get update -q; }
    if [[ " ${missing[*]} " == *"-web "* ]] && ! apt-cache show rustc-web >/dev/null 2>&1; then
        echo "install-deps: this Debian has no rustc-web (Debian 12 carries it in bookworm-security, Debian 13 through its stable updates: the security sources must be in the APT sources, or the system up to date): install Rust $rust_needed or later with rustup (https://rustup.rs), then run this again" >&2
        exit 1
    fi
    as_root apt-get install -y -q --no-install-recommends "${missing[@]}"
    # Debian starts a system-wide broker on port 1883 with the package; the tests and
    # the demo run their own on free ports, so the one installed here is stopped again.
    if [[ " ${missing[*]} " == *" mosquitto "* ]] && [ -d /run/systemd/system ]; then
        echo "install-deps: disabling the system-wide mosquitto.service the package started (fieldsync runs its own brokers)" >&2
        as_root systemctl disable --now mosquitto.service || true
    fi
fi

# A Rust that is still too old: rustup's stable from long ago, or a Debian without its
# security updates.
if rustc_version=$(rustc --version 2>/dev/null | awk '{print $2}'); then
    if older_than "$rustc_version" "$rust_needed"; then
        if command -v rustup >/dev/null 2>&1; then
            echo "install-deps: rustc $rustc_version is too old, $rust_needed or later is needed: run rustup update" >&2
        else
            echo "install-deps: rustc $rustc_version is too old, $rust_needed or later is needed: add bookworm-security (Debian 12) to the APT sources, or bring Debian 13 up to date (apt-get upgrade), and run this again (it installs rustc-web)" >&2
        fi
        exit 1
    fi
fi

# Aedes at the versions tests/aedes/package-lock.json pins, installed again only when
# the lock file changed since the last install.
if [ "$demo_only" -eq 0 ]; then
    aedes="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/tests/aedes"
    if ! cmp -s "$aedes/package-lock.json" "$aedes/node_modules/.package-lock.json.installed"; then
        echo "install-deps: installing Aedes in $aedes" >&2
        (cd "$aedes" && npm ci --no-audit --no-fund --loglevel=error)
        cp "$aedes/package-lock.json" "$aedes/node_modules/.package-lock.json.installed"
    fi
fi
