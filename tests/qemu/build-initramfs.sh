#!/usr/bin/env bash
# Assembles the test VM: Debian's arm64 kernel, and an initramfs (cpio, newc) holding
# busybox, the aarch64 fieldsyncd and fieldctl, the glibc libraries they need, the kernel
# modules for a virtio ext4 disk and network, and this folder's init and scenarios.
#
#   tests/qemu/build-initramfs.sh FIELDSYNCD FIELDCTL
#
# Prints `kernel=PATH` and `initrd=PATH`. Downloaded packages and the built images are
# cached under target/qemu/ (or $FIELDSYNC_QEMU_CACHE), keyed by their inputs, so a
# repeat run with the same binaries only hashes them.
set -euo pipefail
# Debian keeps depmod in sbin, which a user's PATH leaves out.
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
cache="${FIELDSYNC_QEMU_CACHE:-$repo/target/qemu}"

die() { echo "build-initramfs: $*" >&2; exit 1; }

[ "$#" -eq 2 ] || die "usage: $0 FIELDSYNCD FIELDCTL"
fieldsyncd="$(realpath "$1")"
fieldctl="$(realpath "$2")"
[ -x "$fieldsyncd" ] && [ -x "$fieldctl" ] || die "$1 and $2 must be executables"

"$repo/scripts/install-qemu-deps.sh"
command -v aarch64-linux-gnu-readelf >/dev/null || die "aarch64-linux-gnu-readelf is missing (scripts/build-aarch64.sh installs it)"

# Loaded by /init in this order.
modules=(virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_blk crc16
    crc32c_generic mbcache jbd2 ext4 failover net_failover virtio_net)

mkdir -p "$cache/debs"

# deb PACKAGE: the path of PACKAGE:arm64's candidate .deb, downloaded once.
deb() {
    local version file
    version="$(apt-cache show --no-all-versions "$1:arm64" 2>/dev/null | sed -n 's/^Version: //p')"
    [ -n "$version" ] || die "apt knows no $1:arm64 (is the arm64 architecture added and the index fresh?)"
    file="$cache/debs/${1}_${version//:/%3a}_arm64.deb"
    if [ ! -f "$file" ]; then
        echo "build-initramfs: downloading $1 $version" >&2
        (cd "$cache/debs" && apt-get download -q "$1:arm64=$version" >"$cache/download.log" 2>&1) ||
            die "apt-get download $1:arm64=$version failed: $(cat "$cache/download.log")"
    fi
    [ -f "$file" ] || die "apt-get download left no $file"
    echo "$file"
}

kernel_pkg="$(apt-cache depends linux-image-arm64:arm64 2>/dev/null |
    awk '/Depends: linux-image-[0-9]/ { sub(":arm64", "", $2); print $2; exit }')"
[ -n "$kernel_pkg" ] || die "cannot resolve linux-image-arm64 to a kernel package"
kernel_deb="$(deb "$kernel_pkg")"
busybox_deb="$(deb busybox-static)"

# The kernel and the few modules the VM needs, with their modules.dep, once per package.
kdir="$cache/$(basename "$kernel_deb" .deb)"
if [ ! -f "$kdir/done" ]; then
    rm -rf "$kdir"
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' EXIT
    dpkg-deb -x "$kernel_deb" "$tmp"
    # Debian 12 ships the modules under /lib, Debian 13 (merged /usr) under /usr/lib.
    moddir="$tmp/lib/modules"
    [ -d "$moddir" ] || moddir="$tmp/usr/lib/modules"
    [ -d "$moddir" ] || die "$kernel_pkg has no lib/modules or usr/lib/modules"
    kver="$(ls "$moddir")"
    mkdir -p "$kdir/root/lib/modules/$kver"
    cp "$tmp/boot/vmlinuz-$kver" "$kdir/vmlinuz"
    for m in "${modules[@]}"; do
        # Debian 13 compresses its modules with xz, which busybox's insmod cannot read,
        # and builds some of these into the kernel (the guest's init skips those).
        ko="$(find "$moddir/$kver" -name "$m.ko" -o -name "$m.ko.xz" | head -n 1)"
        if [ -z "$ko" ]; then
            grep -q "/$m\.ko\$" "$moddir/$kver/modules.builtin" ||
                die "$kernel_pkg has no $m.ko and does not build it in"
            continue
        fi
        rel="lib/modules/${ko#"$moddir"/}"
        rel="${rel%.xz}"
        mkdir -p "$kdir/root/$(dirname "$rel")"
        case "$ko" in
            *.xz) xz -dc "$ko" >"$kdir/root/$rel" ;;
            *) cp "$ko" "$kdir/root/$rel" ;;
        esac
    done
    cp "$moddir/$kver/"modules.{order,builtin,builtin.modinfo} \
        "$kdir/root/lib/modules/$kver/"
    depmod -b "$kdir/root" "$kver"
    rm -rf "$tmp"
    trap - EXIT
    touch "$kdir/done"
fi

bdir="$cache/$(basename "$busybox_deb" .deb)"
if [ ! -f "$bdir/busybox" ]; then
    tmp="$(mktemp -d)"
    dpkg-deb -x "$busybox_deb" "$tmp"
    mkdir -p "$bdir"
    # /bin on Debian 12, /usr/bin on Debian 13.
    for b in "$tmp/bin/busybox" "$tmp/usr/bin/busybox"; do
        [ -f "$b" ] && cp "$b" "$bdir/busybox.part"
    done
    [ -f "$bdir/busybox.part" ] || die "$busybox_deb has no bin/busybox or usr/bin/busybox"
    mv "$bdir/busybox.part" "$bdir/busybox"
    rm -rf "$tmp"
fi

# The glibc libraries the binaries ask for, and their loader.
sysroot=/usr/aarch64-linux-gnu/lib
libs=()
while read -r lib; do
    [ -e "$sysroot/$lib" ] || die "$lib (needed by the binaries) is not in $sysroot"
    libs+=("$sysroot/$lib")
done < <(aarch64-linux-gnu-readelf -d "$fieldsyncd" "$fieldctl" |
    sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p' | sort -u)
interp="$(aarch64-linux-gnu-readelf -l "$fieldsyncd" | sed -n 's/.*interpreter: \(.*\)\]/\1/p')"
[ -n "$interp" ] || die "cannot read the program interpreter of $fieldsyncd"

# Everything that goes in, by content: the cache key.
key="$(
    {
        echo "$kdir $bdir $interp"
        sha256sum "$0" "$fieldsyncd" "$fieldctl" "${libs[@]}" | cut -d' ' -f1
        (cd "$here" && find init fieldsyncd.toml work-orders.json scenarios -type f | sort |
            xargs sha256sum)
    } | sha256sum | cut -c1-16
)"
initrd="$cache/initramfs-$key.cpio"

if [ ! -f "$initrd" ]; then
    echo "build-initramfs: assembling $(basename "$initrd")" >&2
    stage="$(mktemp -d)"
    trap 'rm -rf "$stage"' EXIT
    mkdir -p "$stage"/{bin,lib,usr/bin,etc/fieldsync,scenarios,proc,sys,dev,run,tmp,data,root}
    cp -a "$kdir/root/lib/modules" "$stage/lib/"
    cp "$bdir/busybox" "$stage/bin/busybox"
    cp "$fieldsyncd" "$fieldctl" "$stage/usr/bin/"
    for lib in "${libs[@]}"; do cp -L "$lib" "$stage/lib/"; done
    mkdir -p "$stage/$(dirname "$interp")"
    cp -L "$sysroot/$(basename "$interp")" "$stage/$interp"
    cp "$here/init" "$stage/init"
    cp "$here/scenarios/"*.sh "$stage/scenarios/"
    cp "$here/fieldsyncd.toml" "$here/work-orders.json" "$stage/etc/fieldsync/"
    chmod 0755 "$stage/init" "$stage/bin/busybox" "$stage/usr/bin/"*
    (cd "$stage" && find . | LC_ALL=C sort |
        cpio --quiet -o -H newc -R 0:0 --reproducible >"$initrd.part")
    mv "$initrd.part" "$initrd"
    rm -rf "$stage"
    trap - EXIT
    # Older images are dead weight once the inputs moved on.
    find "$cache" -maxdepth 1 -name 'initramfs-*.cpio' ! -name "$(basename "$initrd")" -delete
fi

echo "kernel=$kdir/vmlinuz"
echo "initrd=$initrd"
