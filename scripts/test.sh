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

# Three tests switch users (the socket's peer-credential check) or mount a small tmpfs
# (a full disk). Said now rather than after a twenty-minute build.
if [ "$(id -u)" -ne 0 ]; then
    echo "test.sh: the suite needs root (three tests switch users or mount a tmpfs): run it as root, or with sudo -E env PATH=\"\$PATH\" scripts/test.sh to keep your Rust toolchain" >&2
    exit 1
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
