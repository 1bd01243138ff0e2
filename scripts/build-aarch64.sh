#!/usr/bin/env bash
# Cross-builds `fieldsyncd` and `fieldctl` for the handheld with Debian's Rust toolchain
# and the `device` profile (size first, LTO, panic=abort), installing what is missing.
# armv7 (armhf) is built too when Debian offers its standard library at the same version
# as rustc-web; otherwise the reason is printed and only aarch64 is built.
#
#   scripts/build-aarch64.sh                  # aarch64, and armv7 when possible
#   scripts/build-aarch64.sh --aarch64-only   # what the QEMU test needs
#
# Binaries: target/aarch64/<triple>/device/{fieldsyncd,fieldctl}, stripped. The build
# has its own target dir so that it never invalidates the host build's cache.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"

armv7=1
for arg in "$@"; do
    case "$arg" in
        --aarch64-only) armv7=0 ;;
        -h | --help) sed -n '2,11s/^# \{0,1\}//p' "$0"; exit 0 ;;
        *) echo "build-aarch64: unknown argument $arg" >&2; exit 2 ;;
    esac
done

say() { echo "build-aarch64: $*" >&2; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo -n "$@"; fi
}

export DEBIAN_FRONTEND=noninteractive
updated=0
apt_update() {
    # A mirror index briefly out of step with its files fails the first update.
    as_root apt-get update -q >/dev/null || { sleep 5; as_root apt-get update -q >/dev/null; }
    updated=1
}
apt_install() {
    as_root apt-get install -y -q --no-install-recommends "$@" >/dev/null
}
installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }
installed_version() { dpkg-query -W -f='${Version}' "$1" 2>/dev/null; }

add_arch() {
    if ! dpkg --print-foreign-architectures | grep -qx "$1"; then
        say "adding the $1 architecture"
        as_root dpkg --add-architecture "$1"
        updated=0
    fi
}

# ---- the host side of the toolchain ----------------------------------------------------
add_arch arm64
host=()
for pkg in gcc-aarch64-linux-gnu libc6-dev-arm64-cross rustc-web cargo-web; do
    installed "$pkg" || host+=("$pkg")
done
if [ "${#host[@]}" -gt 0 ]; then
    say "installing ${host[*]}"
    [ "$updated" -eq 1 ] || apt_update
    apt_install "${host[@]}"
fi
rust_version="$(installed_version rustc-web)"
[ -n "$rust_version" ] || { say "rustc-web is not installed"; exit 1; }

# The target's standard library must be the very build of the compiler.
install_std() { # install_std <debian arch>
    local pkg="libstd-rust-web-dev:$1"
    [ "$(installed_version "$pkg")" = "$rust_version" ] && return 0
    if ! apt-get install -y -q --no-install-recommends --dry-run "$pkg=$rust_version" \
        >/dev/null 2>&1; then
        apt_update
    fi
    apt_install "$pkg=$rust_version"
}

install_std arm64

# ---- the build --------------------------------------------------------------------------
# rustup's cargo and rustc come first on PATH; this build is Debian's, and nothing the
# host build was given (flags, wrappers, a pinned rustup toolchain) may leak into it.
build() { # build <rust triple> <gcc prefix>
    local triple="$1" gcc="$2"
    local upper="${triple//-/_}"
    upper="${upper^^}"
    say "building for $triple with $(/usr/bin/rustc --version)"
    local started=$SECONDS
    env -u RUSTFLAGS -u CARGO_ENCODED_RUSTFLAGS -u RUSTC_WRAPPER -u RUSTC_WORKSPACE_WRAPPER \
        -u RUSTUP_TOOLCHAIN -u CARGO_BUILD_TARGET -u CARGO_TARGET_DIR -u CARGO \
        PATH="/usr/bin:$PATH" \
        RUSTC=/usr/bin/rustc \
        RUSTDOC=/usr/bin/rustdoc \
        CARGO_TARGET_DIR="$repo/target/aarch64" \
        "CARGO_TARGET_${upper}_LINKER=$gcc-gcc" \
        "CC_${triple//-/_}=$gcc-gcc" \
        "AR_${triple//-/_}=$gcc-ar" \
        /usr/bin/cargo build --locked --quiet \
        --profile device --target "$triple" \
        -p fieldsyncd -p fieldsync-ui-bridge --bins
    local out="$repo/target/aarch64/$triple/device"
    "$gcc-strip" "$out/fieldsyncd" "$out/fieldctl"
    say "$triple done in $((SECONDS - started)) s:"
    ls -l "$out/fieldsyncd" "$out/fieldctl" >&2
}

build aarch64-unknown-linux-gnu aarch64-linux-gnu

[ "$armv7" -eq 1 ] || exit 0

# ---- armv7, when Debian lets us ---------------------------------------------------------
# Nothing here may fail the script: aarch64 is built, armv7 is a bonus. An armhf index
# that cannot be fetched would fail every later `apt-get update` on this machine, so the
# architecture is only kept when armv7 is really built.
armv7_skip() {
    say "armv7 skipped: $*"
    say "integrators can build armv7-unknown-linux-gnueabihf with cross (Cross.toml)."
    if ! dpkg-query -W -f='${Architecture}\n' 2>/dev/null | grep -qx armhf; then
        as_root dpkg --remove-architecture armhf 2>/dev/null || true
    fi
    exit 0
}
armhf_versions() {
    apt-cache madison libstd-rust-web-dev:armhf 2>/dev/null | awk '{print $3}' | tr '\n' ' '
}
add_arch armhf
index_ok=1
as_root apt-get update -q >/dev/null 2>&1 || { sleep 5; as_root apt-get update -q >/dev/null 2>&1; } \
    || index_ok=0
offered="$(armhf_versions)"
if ! grep -qw -- "$rust_version" <<<"$offered"; then
    why="rustc-web is $rust_version but Debian offers libstd-rust-web-dev:armhf only at"
    why="$why ${offered:-no version}; the standard library must match the compiler exactly"
    [ "$index_ok" -eq 1 ] || why="$why (the armhf package index failed to download: mirror out of step)"
    armv7_skip "$why."
fi
apt_install gcc-arm-linux-gnueabihf libc6-dev-armhf-cross "libstd-rust-web-dev:armhf=$rust_version" \
    || armv7_skip "installing the armhf toolchain failed."
build armv7-unknown-linux-gnueabihf arm-linux-gnueabihf
