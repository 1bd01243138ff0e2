//! The link policy: what may go out on which link. A pure function, so the whole table
//! is tested below; the uplink asks it before every record batch and photo chunk.

use super::LinkClass;

/// The two kinds of traffic the policy tells apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Traffic {
    /// Operations (records, checklists, stages) and work order updates: small, urgent.
    Records,
    /// Photo uploads and attachment downloads: large, can wait for a better link.
    Files,
}

/// Whether `traffic` may use a link of class `class`. `files_on_wifi_only` is the
/// inspector's "Wi-Fi only for files" switch: it keeps files off every cellular or
/// metered link, and off a link nothing can vouch for.
pub fn allows(class: LinkClass, traffic: Traffic, files_on_wifi_only: bool) -> bool {
    use LinkClass::*;
    match (traffic, class) {
        (_, Offline) => false,
        (Traffic::Records, _) => true,
        (Traffic::Files, TwoG) => false,
        (Traffic::Files, Wifi | Ethernet) => true,
        (Traffic::Files, Cellular | Metered | Unknown) => !files_on_wifi_only,
    }
}

/// Why files are held on this link, for the app's banner; `None` when they may go.
pub fn files_held_because(class: LinkClass, files_on_wifi_only: bool) -> Option<&'static str> {
    if allows(class, Traffic::Files, files_on_wifi_only) {
        return None;
    }
    Some(match class {
        LinkClass::Offline => "no link",
        LinkClass::TwoG => "photos wait for a faster link than 2G",
        _ => "photos wait for Wi-Fi (\"Wi-Fi only for files\" is on)",
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use LinkClass::*;
    use Traffic::*;

    #[test]
    fn the_whole_table() {
        // (class, records, files, files with "Wi-Fi only for files")
        let table = [
            (Offline, false, false, false),
            (TwoG, true, false, false),
            (Cellular, true, true, false),
            (Metered, true, true, false),
            (Wifi, true, true, true),
            (Ethernet, true, true, true),
            (Unknown, true, true, false),
        ];
        for (class, records, files, files_wifi_only) in table {
            for wifi_only in [false, true] {
                assert_eq!(
                    allows(class, Records, wifi_only),
                    records,
                    "{class:?} records"
                );
            }
            assert_eq!(allows(class, Files, false), files, "{class:?} files");
            assert_eq!(
                allows(class, Files, true),
                files_wifi_only,
                "{class:?} files, Wi-Fi only"
            );
            assert_eq!(
                files_held_because(class, true).is_none(),
                files_wifi_only,
                "{class:?} reason"
            );
        }
    }
}
