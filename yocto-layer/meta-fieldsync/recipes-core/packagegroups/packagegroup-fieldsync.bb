SUMMARY = "fieldsync for an inspection handheld image"
DESCRIPTION = "The fieldsync daemon, its units and configuration, and fieldctl for \
               field support. NetworkManager and ModemManager, which tell the daemon \
               which link is up, come along when their layers are in the build."
HOMEPAGE = "https://example.invalid/fieldsync"
BUGTRACKER = "https://example.invalid/fieldsync/issues"
SECTION = "network"
LICENSE = "MIT"

inherit packagegroup

RDEPENDS:${PN} = "fieldsync \
                  fieldsync-fieldctl"

# Without them the daemon still runs, but sees no link and keeps everything queued. Their
# layers are optional, so each is recommended only when its layer is in the build.
RRECOMMENDS:${PN} = "ca-certificates \
                     ${@bb.utils.contains('BBFILE_COLLECTIONS', 'networking-layer', 'networkmanager', '', d)} \
                     ${@bb.utils.contains('BBFILE_COLLECTIONS', 'openembedded-layer', 'modemmanager', '', d)}"
