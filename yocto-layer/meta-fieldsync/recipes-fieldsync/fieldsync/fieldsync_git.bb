SUMMARY = "Offline work orders, outbox and MQTT uplink for inspection handhelds"
SUMMARY:${PN}-fieldctl = "Command-line client of the fieldsync daemon, for field support"
DESCRIPTION = "fieldsyncd keeps an inspector's work orders, records and photos on the \
               device, watches the modem and Wi-Fi through NetworkManager and ModemManager, \
               and delivers what waits over MQTT, exactly once, when a link is back. The \
               touchscreen app talks to it over a Unix socket."
# The project has no public page yet; the address is the workspace's `repository`.
HOMEPAGE = "https://example.invalid/fieldsync"
BUGTRACKER = "https://example.invalid/fieldsync/issues"
SECTION = "network"
# fieldsync itself is Apache-2.0 (LICENSE). The binaries link the crates of Cargo.lock in
# statically, so the package carries their licences too: where a crate offers a choice,
# one listed here; SQLite, bundled by rusqlite, is public domain. Check again after a
# dependency change: cargo tree -p fieldsyncd -e normal --prefix none -f "{l}" | sort -u
LICENSE = "Apache-2.0 & MIT & ISC & BSD-2-Clause & BSD-3-Clause & Zlib & Unicode-3.0 & PD"
LIC_FILES_CHKSUM = "file://LICENSE;md5=3b83ef96387f14655fc854ddc3c6bd57"
CVE_PRODUCT = "fieldsync"

PV = "0.1.0+git"

# Integrator settings; set them in local.conf, a distro or a fieldsync_%.bbappend.
#
# FIELDSYNC_UI_GROUP: the group of the touchscreen app's user. Only its members may use
# /run/fieldsync/ui.sock; it is written into the socket unit, sysusers.d and the daemon's
# configuration.
FIELDSYNC_UI_GROUP ??= "fieldsync-ui"
#
# FIELDSYNC_CONFIG_FRAGMENTS: extra drop-ins for /etc/fieldsync/config.d, as file names
# found through FILESEXTRAPATHS (a bbappend's files folder), each ending in .toml. They are
# merged over fieldsyncd.toml in sorted order: the broker's address and certificates
# belong here, e.g. "10-broker.toml".
FIELDSYNC_CONFIG_FRAGMENTS ??= ""
#
# FIELDSYNC_GIT_URI and SRCREV: where the source comes from. The layer lives in the
# fieldsync repository and fieldsync-crates.inc is generated from that same commit's
# Cargo.lock, so by default the recipe builds the commit its own checkout is at, from the
# local clone: no network, and the crate list always matches. Point both at a mirror and
# a commit only when the layer is used apart from its repository, and regenerate the
# crate list for that commit with `bitbake -c update_crates fieldsync`.
FIELDSYNC_SRCDIR ??= "${@os.path.normpath(d.getVar('FILE_DIRNAME') + '/../../../..')}"
FIELDSYNC_GIT_URI ??= "git://${FIELDSYNC_SRCDIR};protocol=file;nobranch=1"

SRC_URI = "${FIELDSYNC_GIT_URI};destsuffix=${BP} \
           ${@' '.join('file://' + f for f in d.getVar('FIELDSYNC_CONFIG_FRAGMENTS').split())} \
"
SRCREV ??= "${@fieldsync_checkout_rev(d)}"
# A SRCREV read from the checkout changes without any recipe file changing: parse again
# each time rather than reuse the revision cached before the last commit.
# nooelint: oelint.vars.mispell.unknown
BB_DONT_CACHE = "${@'1' if d.getVar('FIELDSYNC_GIT_URI').startswith('git://' + d.getVar('FIELDSYNC_SRCDIR') + ';') else ''}"

# Where the config fragments are unpacked: scarthgap unpacks into WORKDIR and has no
# UNPACKDIR; later series unpack into UNPACKDIR, which they set, and refuse a recipe that
# makes it WORKDIR.
FIELDSYNC_UNPACKED = "${@d.getVar('UNPACKDIR') or d.getVar('WORKDIR')}"

inherit cargo cargo-update-recipe-crates ptest-cargo systemd useradd features_check

require ${BPN}-crates.inc

# Type=notify, socket activation, sysusers.d and tmpfiles.d: systemd is the only init
# the daemon is written for.
REQUIRED_DISTRO_FEATURES = "systemd"

# The workspace also holds the integration suite, which needs a broker and a D-Bus
# daemon at build time; the device gets the daemon and fieldctl, and ptest their unit
# tests.
CARGO_BUILD_FLAGS += "-p fieldsyncd -p fieldsync-ui-bridge"

# The bundled SQLite syncs its WAL with fdatasync(), as SQLite's own Linux builds do;
# cargo runs outside the source tree here, so the workspace's .cargo/config.toml, which
# says the same for every other build, is not read.
export LIBSQLITE3_FLAGS = "-DHAVE_FDATASYNC=1"

def fieldsync_checkout_rev(d):
    import subprocess
    srcdir = d.getVar('FIELDSYNC_SRCDIR')
    try:
        return subprocess.check_output(['git', '-C', srcdir, 'rev-parse', 'HEAD'],
                                       stderr=subprocess.DEVNULL, text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        raise bb.parse.SkipRecipe(
            '%s is not a git checkout of fieldsync: set FIELDSYNC_GIT_URI and SRCREV '
            'to the commit to build' % srcdir)

USERADD_PACKAGES = "${PN}"
GROUPADD_PARAM:${PN} = "--system ${FIELDSYNC_UI_GROUP}"
USERADD_PARAM:${PN} = "--system --user-group --no-create-home \
                       --home-dir ${localstatedir}/lib/fieldsync \
                       --shell ${base_sbindir}/nologin fieldsync"

SYSTEMD_PACKAGES = "${PN}"
SYSTEMD_SERVICE:${PN} = "fieldsyncd.socket fieldsyncd.service"

do_install() {
    install -d ${D}${bindir}
    install -m 0755 ${B}/target/${CARGO_TARGET_SUBDIR}/fieldsyncd ${D}${bindir}/fieldsyncd
    install -m 0755 ${B}/target/${CARGO_TARGET_SUBDIR}/fieldctl ${D}${bindir}/fieldctl

    install -d ${D}${systemd_system_unitdir}
    install -m 0644 ${S}/systemd/fieldsyncd.service ${D}${systemd_system_unitdir}/fieldsyncd.service
    install -m 0644 ${S}/systemd/fieldsyncd.socket ${D}${systemd_system_unitdir}/fieldsyncd.socket
    install -d ${D}${nonarch_libdir}/sysusers.d ${D}${nonarch_libdir}/tmpfiles.d
    install -m 0644 ${S}/systemd/sysusers.d/fieldsync.conf ${D}${nonarch_libdir}/sysusers.d/fieldsync.conf
    install -m 0644 ${S}/systemd/tmpfiles.d/fieldsync.conf ${D}${nonarch_libdir}/tmpfiles.d/fieldsync.conf

    install -d ${D}${sysconfdir}/fieldsync
    install -m 0644 ${S}/daemon/config/fieldsyncd.toml ${D}${sysconfdir}/fieldsync/fieldsyncd.toml
    install -d -m 0750 ${D}${sysconfdir}/fieldsync/config.d
    install -m 0644 ${S}/daemon/config/config.d/README ${D}${sysconfdir}/fieldsync/config.d/README
    for fragment in ${FIELDSYNC_CONFIG_FRAGMENTS}; do
        if [ "${fragment%.toml}" = "$fragment" ] || [ "${fragment##*/}" != "$fragment" ]; then
            bbfatal "FIELDSYNC_CONFIG_FRAGMENTS: $fragment is not a file name ending in .toml (the daemon reads only config.d/*.toml)"
        fi
        install -m 0640 ${FIELDSYNC_UNPACKED}/$fragment ${D}${sysconfdir}/fieldsync/config.d/$fragment
    done
    # Drop-ins may hold broker credentials: the daemon's group reads them, nobody else.
    chown -R root:fieldsync ${D}${sysconfdir}/fieldsync/config.d

    sed -i -e 's/fieldsync-ui/${FIELDSYNC_UI_GROUP}/g' \
        ${D}${systemd_system_unitdir}/fieldsyncd.socket \
        ${D}${nonarch_libdir}/sysusers.d/fieldsync.conf \
        ${D}${sysconfdir}/fieldsync/fieldsyncd.toml
}

PACKAGE_BEFORE_PN = "${PN}-fieldctl"

FILES:${PN} += "${nonarch_libdir}/sysusers.d/fieldsync.conf \
                ${nonarch_libdir}/tmpfiles.d/fieldsync.conf"
FILES:${PN}-fieldctl += "${bindir}/fieldctl"

CONFFILES:${PN} = "${sysconfdir}/fieldsync/fieldsyncd.toml"
