#!/usr/bin/env bash
# Installs what booting the aarch64 build under whole-system QEMU needs on Debian, only
# what is missing: the emulator, qemu-img, e2fsprogs for the store disk (mkfs.ext4 and
# debugfs), cpio, xz and kmod (depmod) for the initramfs, and the arm64 architecture so that
# `apt-get download` can fetch the guest's kernel and busybox. Safe to run again.
#
#   scripts/install-qemu-deps.sh
set -euo pipefail
# Debian keeps mkfs.ext4, debugfs and depmod in sbin, which a user's PATH leaves out.
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo -n "$@"; fi
}

missing=()
need() { # need <command> <debian package>
    command -v "$1" >/dev/null 2>&1 || missing+=("$2")
}

# qemu-utils goes along with the emulator: a qemu-img from another release would be
# removed by apt to make room for the emulator's own.
command -v qemu-system-aarch64 >/dev/null 2>&1 || missing+=(qemu-system-arm qemu-utils)
need qemu-img qemu-utils
need mkfs.ext4 e2fsprogs
need debugfs e2fsprogs
need cpio cpio
need xz xz-utils
need depmod kmod
need dpkg-deb dpkg

updated=0
apt_update() {
    [ "$updated" -eq 0 ] || return 0
    export DEBIAN_FRONTEND=noninteractive
    # A mirror index briefly out of step with its files fails the first update.
    as_root apt-get update -q || { sleep 5; as_root apt-get update -q; }
    updated=1
}

if ! dpkg --print-foreign-architectures | grep -qx arm64; then
    echo "install-qemu-deps: adding the arm64 architecture" >&2
    as_root dpkg --add-architecture arm64
    apt_update
fi

if [ "${#missing[@]}" -gt 0 ]; then
    # Two commands may come from one package.
    mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
    echo "install-qemu-deps: installing ${missing[*]}" >&2
    apt_update
    packages=()
    for p in "${missing[@]}"; do
        if [ "$p" = qemu-utils ]; then
            # A newer qemu-utils (from backports, say) breaks the release's emulator:
            # take the one that matches the emulator apt will install, even if older.
            ver="$(apt-cache policy qemu-system-arm | awk '/Candidate:/ {print $2}')"
            packages+=("qemu-utils=$ver")
        else
            packages+=("$p")
        fi
    done
    as_root env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -q --no-install-recommends --allow-downgrades "${packages[@]}"
fi

# `apt-get download` needs an index that knows the arm64 packages.
if ! apt-cache show busybox-static:arm64 >/dev/null 2>&1; then
    apt_update
fi
