//! What the device's network link is right now, as NetworkManager and ModemManager say:
//! a small [`LinkState`] published on a `watch` channel for the uplink and the status.
//!
//! The daemon never guesses the link from failed connections while NetworkManager is
//! there to ask. Without NetworkManager (or without a system bus) the class is
//! [`LinkClass::Unknown`] and the uplink simply tries the broker.

mod network_manager;
pub mod policy;

use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// The classes the sync policy tells apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LinkClass {
    /// No connection that reaches beyond the device.
    Offline,
    /// GPRS or EDGE: records only.
    TwoG,
    /// 3G, LTE or 5G on the modem (or a phone's tethering).
    Cellular,
    /// Wi-Fi or Ethernet that NetworkManager says (or guesses) is metered.
    Metered,
    Wifi,
    Ethernet,
    /// Nothing on the bus can say: the broker is tried, records go, and files too unless
    /// "Wi-Fi only for files" is on.
    Unknown,
}

impl LinkClass {
    /// The name used on the UI socket, in `fieldctl status` and in the logs.
    pub fn as_str(self) -> &'static str {
        match self {
            LinkClass::Offline => "offline",
            LinkClass::TwoG => "2g",
            LinkClass::Cellular => "cellular",
            LinkClass::Metered => "metered",
            LinkClass::Wifi => "wifi",
            LinkClass::Ethernet => "ethernet",
            LinkClass::Unknown => "unknown",
        }
    }
}

/// Who told us the class.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkSource {
    NetworkManager,
    /// No watcher configured, or NetworkManager (or the bus) is not there.
    None,
}

impl LinkSource {
    pub fn as_str(self) -> &'static str {
        match self {
            LinkSource::NetworkManager => "networkmanager",
            LinkSource::None => "none",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkState {
    pub class: LinkClass,
    pub source: LinkSource,
    /// NetworkManager's primary connection: a move from one connection to another (Wi-Fi
    /// to modem, say) means the broker's TCP connection must be made again, even when
    /// the class stays the same.
    pub connection: Option<String>,
    /// For people: "LTE", "EDGE", "Wi-Fi, metered (guessed)", "no NetworkManager".
    pub detail: String,
}

impl LinkState {
    /// The state while nothing can tell: try the broker.
    pub fn unknown(detail: impl Into<String>) -> LinkState {
        LinkState {
            class: LinkClass::Unknown,
            source: LinkSource::None,
            connection: None,
            detail: detail.into(),
        }
    }

    /// The state at start, until NetworkManager's first answer (or its absence) is in.
    fn asking() -> LinkState {
        LinkState {
            class: LinkClass::Unknown,
            source: LinkSource::NetworkManager,
            connection: None,
            detail: ASKING.into(),
        }
    }

    /// Whether the watcher has not said anything yet. The uplink waits for its first word
    /// (bounded by [`FIRST_WORD`]): connecting at once could send on a link that turns
    /// out to be offline, or one the policy keeps records or photos off. An answer can
    /// be "unknown" too (a captive portal, NetworkManager starting): that is a word.
    pub fn is_asking(&self) -> bool {
        *self == LinkState::asking()
    }
}

const ASKING: &str = "asking NetworkManager";

/// How long the uplink waits at start for the watcher's first word. The watcher's calls
/// time out after 5 s and then it says "unknown", so this is only a backstop.
pub const FIRST_WORD: Duration = Duration::from_secs(10);

/// Starts following the link. With `watch_network_manager` off, the state stays
/// [`LinkClass::Unknown`] and nothing runs.
pub fn spawn(
    watch_network_manager: bool,
    shutdown: CancellationToken,
) -> watch::Receiver<LinkState> {
    if !watch_network_manager {
        let (tx, rx) = watch::channel(LinkState::unknown("link watching is off"));
        // Kept until shutdown: with the sender gone, waiting for a change would return
        // at once, over and over.
        tokio::spawn(async move {
            shutdown.cancelled().await;
            drop(tx);
        });
        return rx;
    }
    let (tx, rx) = watch::channel(LinkState::asking());
    tokio::spawn(network_manager::follow(tx, shutdown, RETRY_BUS));
    rx
}

/// How long to wait before trying the system bus again after it went away.
const RETRY_BUS: (Duration, Duration) = (Duration::from_millis(500), Duration::from_secs(30));

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_of_unknown_is_not_taken_for_no_answer_yet() {
        assert!(LinkState::asking().is_asking());
        let portal = LinkState {
            class: LinkClass::Unknown,
            source: LinkSource::NetworkManager,
            connection: Some("/org/freedesktop/NetworkManager/ActiveConnection/1".into()),
            detail: "NetworkManager's check sees a captive portal".into(),
        };
        assert!(!portal.is_asking());
        assert!(!LinkState::unknown("no system bus").is_asking());
    }
}
