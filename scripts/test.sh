#!/usr/bin/env bash
# The whole test suite, as CI runs it: installs what is missing, then formatting, lints,
# unit and integration tests (the real daemon, its socket, SQLite on disk), the systemd
# unit checks and the Yocto layer lint.
#
#   scripts/test.sh
#
# FIELDSYNC_CRASH_ROUNDS sets how many times the crash test kills the daemon (200).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# Debian keeps the broker, mkfs.ext4, debugfs and depmod in sbin, which a user's PATH
# leaves out.
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

# Three tests switch users (the socket's peer-credential check) or mount a small tmpfs
# (a full disk), so the suite runs as root: a user comes back here through sudo, with
# root's own environment (its HOME, so nothing under the user's ~/.cargo or ~/.npm
# becomes root's).
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || {
        echo "test.sh: the suite needs root (three tests switch users or mount a tmpfs), and sudo is not installed: run it as root" >&2
        exit 1
    }
    echo "test.sh: the suite needs root (three tests switch users or mount a tmpfs); asking sudo" >&2
    exec sudo "$PWD/scripts/test.sh" "$@"
fi

# Run through sudo, what the build and the tests leave in the checkout goes back to the
# user who asked, so that their own cargo and npm can use it afterwards.
give_back() {
    local path
    for path in target tests/aedes/node_modules; do
        [ -e "$path" ] && chown -R "$SUDO_UID:${SUDO_GID:-$SUDO_UID}" "$path"
    done
    return 0
}
if [ -n "${SUDO_UID:-}" ] && [ "$SUDO_UID" != 0 ]; then
    trap give_back EXIT
fi

scripts/install-deps.sh

step() { printf '\n== %s\n' "$*"; }

step "format"
cargo fmt --all -- --check
step "clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
step "unit and integration tests"
cargo test --workspace --locked
step "systemd units"
scripts/check-systemd.sh
step "Yocto layer"
scripts/lint-yocto.sh
step "all passed"
