//! The link watcher: NetworkManager's state, connectivity, primary connection and its
//! type, `Metered`, the primary connection's devices, and for a modem ModemManager's
//! access technologies, read over the system bus with zbus.
//!
//! Driven by signals: a `PropertiesChanged` of NetworkManager's main object or of a
//! ModemManager modem that touches a property the class depends on, or either name
//! coming or going, makes the watcher read the few properties it needs again and
//! publish the class when it changed. Reading everything again is a handful of calls
//! and cannot miss a change the way patching a cached copy signal by signal can. The
//! many other signals the real services send (access point strength at every scan,
//! signal quality and bearer counters every 30 s) wake nothing: between the signals
//! that matter nothing runs (promise 7).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::{mpsc, watch, Notify};
use tokio_util::sync::CancellationToken;
use zbus::zvariant::{OwnedValue, Value};
use zbus::{Connection, MatchRule, MessageStream};

use super::{LinkClass, LinkSource, LinkState};

const NM: &str = "org.freedesktop.NetworkManager";
const NM_PATH: &str = "/org/freedesktop/NetworkManager";
const NM_ACTIVE: &str = "org.freedesktop.NetworkManager.Connection.Active";
const NM_DEVICE: &str = "org.freedesktop.NetworkManager.Device";
const MM: &str = "org.freedesktop.ModemManager1";
const MM_PATH: &str = "/org/freedesktop/ModemManager1";
const MM_MODEM: &str = "org.freedesktop.ModemManager1.Modem";

/// A change arrives as a burst of signals: real NetworkManager sends one per property,
/// the primary connection first and the state, metering and connectivity up to some
/// 60 ms later, with gaps of up to about 40 ms (after "disconnecting", say). One read
/// once no signal has come for this long sees the finished picture, not a moment in
/// between.
const SETTLE: Duration = Duration::from_millis(75);
/// Longest wait for a burst to end, so that a service that never stops talking is
/// still read.
const SETTLE_AT_MOST: Duration = Duration::from_millis(300);
/// Longest wait for the bus or NetworkManager to answer one call.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// After a failed read, when to try again even if no signal comes.
const REREAD: Duration = Duration::from_secs(5);

/// NetworkManager's properties that [`read`] uses or that announce a change of what it
/// reads; a signal about any other is not worth a read.
const NM_KEYS: [&str; 7] = [
    "State",
    "Connectivity",
    "PrimaryConnection",
    "PrimaryConnectionType",
    "Metered",
    "ActiveConnections",
    "Startup",
];
/// The same for a ModemManager modem.
const MM_KEYS: [&str; 1] = ["AccessTechnologies"];

// NetworkManager's NMState, NMConnectivityState, NMMetered and NMDeviceType values.
const NM_STATE_UNKNOWN: u32 = 0;
const NM_STATE_DISCONNECTED: u32 = 20;
const NM_STATE_CONNECTING: u32 = 40;
const NM_STATE_CONNECTED_LOCAL: u32 = 50;
const NM_STATE_CONNECTED_SITE: u32 = 60;
const NM_CONNECTIVITY_NONE: u32 = 1;
const NM_CONNECTIVITY_PORTAL: u32 = 2;
const NM_CONNECTIVITY_LIMITED: u32 = 3;
const NM_CONNECTIVITY_FULL: u32 = 4;
const NM_ACTIVE_CONNECTION_ACTIVATED: u32 = 2;
const NM_METERED_YES: u32 = 1;
const NM_METERED_GUESS_YES: u32 = 3;
const NM_DEVICE_ETHERNET: u32 = 1;
const NM_DEVICE_WIFI: u32 = 2;
const NM_DEVICE_BT: u32 = 5;
const NM_DEVICE_MODEM: u32 = 8;
const NM_DEVICE_BOND: u32 = 10;
const NM_DEVICE_VLAN: u32 = 11;
const NM_DEVICE_BRIDGE: u32 = 13;
const NM_DEVICE_TEAM: u32 = 15;
const NM_DEVICE_MACVLAN: u32 = 18;
const NM_DEVICE_VETH: u32 = 20;

// ModemManager's MMModemAccessTechnology bits.
const MM_GSM: u32 = 1 << 1;
const MM_GSM_COMPACT: u32 = 1 << 2;
const MM_GPRS: u32 = 1 << 3;
const MM_EDGE: u32 = 1 << 4;
const MM_1XRTT: u32 = 1 << 10;
/// NB-IoT is LTE by name and slower than EDGE in practice: files wait as on 2G.
const MM_LTE_NB_IOT: u32 = 1 << 17;
const MM_SLOW: u32 = MM_GSM | MM_GSM_COMPACT | MM_GPRS | MM_EDGE | MM_1XRTT | MM_LTE_NB_IOT;
/// UMTS through HSPA+, EV-DO, LTE, 5G NR and LTE Cat-M.
const MM_FAST: u32 = (0b1_1111 << 5) | (0b111 << 11) | (1 << 14) | (1 << 15) | (1 << 16);

/// What the watcher read, before it is classified.
#[derive(Debug, Default, Clone, PartialEq)]
pub(super) struct Snapshot {
    pub state: u32,
    /// NetworkManager's `Startup`: it has not yet brought up the connections it
    /// manages, so a state short of connected says nothing about the link yet.
    pub starting: bool,
    pub connectivity: u32,
    /// The primary connection's object path; `None` when NetworkManager names none.
    pub primary: Option<String>,
    /// The primary connection is activated. NetworkManager's global state says
    /// "connecting" while any other connection is still coming up, even with this one
    /// carrying the default route.
    pub primary_activated: bool,
    /// `PrimaryConnectionType`, or the active connection's `Type` when that is missing.
    pub kind: String,
    pub metered: u32,
    /// Device types of the primary connection.
    pub devices: Vec<u32>,
    /// The modem's access technologies when the primary connection runs on one and
    /// ModemManager answers.
    pub access: Option<u32>,
    /// The primary connection runs on a modem ModemManager drives (NetworkManager names
    /// it by ModemManager's object path): its word on the technology is awaited.
    pub mm_modem: bool,
    /// A call after NetworkManager's own properties failed or timed out (an object went
    /// away mid-read, a busy service): what is missing is read again soon, and until
    /// then this read cannot loosen the class.
    pub incomplete: bool,
    /// An Ethernet device of the primary connection is a phone's USB tethering (by its
    /// driver): cellular, whatever its device type says.
    pub tethered: bool,
    /// When the primary connection rides on something the watcher cannot see through
    /// (a WireGuard or other tunnel holding the default route): the other activated
    /// connections, one of which carries it.
    pub under: Vec<Snapshot>,
}

/// Device types a connection's class can be read from, in the order they decide it.
const SEEN_THROUGH: [u32; 5] = [
    NM_DEVICE_MODEM,
    NM_DEVICE_BT,
    NM_DEVICE_WIFI,
    NM_DEVICE_ETHERNET,
    NM_DEVICE_VETH,
];

/// Drivers of phones' USB tethering, which NetworkManager shows as Ethernet: iPhones
/// (`ipheth`) and Android's RNDIS. (`cdc_ether` and `cdc_ncm` are left out: USB
/// Ethernet adapters and docks use them too.)
const TETHERING_DRIVERS: [&str; 2] = ["ipheth", "rndis_host"];

/// Turns what NetworkManager and ModemManager said into a class. Pure: tested below.
pub(super) fn classify(s: &Snapshot) -> LinkState {
    let state = |class, detail: String| LinkState {
        class,
        source: LinkSource::NetworkManager,
        connection: s.primary.clone(),
        detail,
    };
    // A connection still activating beside a working one (a slow modem next to depot
    // Wi-Fi at boot) holds the global state at "connecting"; the working one decides.
    let global = if s.state == NM_STATE_CONNECTING && s.primary_activated {
        NM_STATE_CONNECTED_SITE
    } else {
        s.state
    };
    let s = &Snapshot {
        state: global,
        ..s.clone()
    };
    if s.state < NM_STATE_CONNECTED_SITE && s.starting {
        // A restarted NetworkManager owns its name before it has taken its connections
        // back; calling that "offline" would drop a broker connection that works.
        return state(LinkClass::Unknown, "NetworkManager is starting".into());
    }
    if s.state == NM_STATE_UNKNOWN {
        // NetworkManager's own word for "cannot say": its API asks applications to
        // assume a link may be there. Also what a missing or mistyped `State` reads as.
        return state(
            LinkClass::Unknown,
            "NetworkManager does not say its state".into(),
        );
    }
    if s.state < NM_STATE_CONNECTED_SITE {
        // Connected without a default route: a broker on the local network may answer.
        if s.state == NM_STATE_CONNECTED_LOCAL {
            return state(LinkClass::Unknown, "local network only".into());
        }
        // NetworkManager's check runs on the default route, whoever set it up: a link it
        // does not manage (ifupdown, a vendor's modem tool) shows only there. Only in
        // "disconnected": while a connection goes down or comes up the check's last
        // answer is stale.
        if s.state == NM_STATE_DISCONNECTED && s.connectivity >= NM_CONNECTIVITY_PORTAL {
            return state(
                LinkClass::Unknown,
                "a link NetworkManager does not manage".into(),
            );
        }
        return state(
            LinkClass::Offline,
            format!("NetworkManager state {}", s.state),
        );
    }
    // What the connectivity check says only adds to the detail: the class comes from
    // the medium, so that EDGE stays EDGE for the link policy whatever the check sees.
    let limited = match s.connectivity {
        // Connected with a default route, yet "none": NetworkManager says so until its
        // first check after a connection comes up has answered, which takes as long as
        // the check's server does, and also for a link without carrier that it has not
        // taken down yet. Nothing tells the two apart: the broker is tried.
        NM_CONNECTIVITY_NONE => ", no connectivity seen (yet)",
        // NetworkManager says "portal" for any unexpected answer to its check: behind a
        // transparent proxy or a carrier's header injection too, where the broker may
        // well be reachable. The broker is tried.
        NM_CONNECTIVITY_PORTAL => ", behind a captive portal",
        // The check's server does not answer: a private APN or a depot network may
        // still reach the broker.
        NM_CONNECTIVITY_LIMITED => ", limited connectivity",
        _ => "",
    };
    let metered = matches!(s.metered, NM_METERED_YES | NM_METERED_GUESS_YES);
    let metered_words = match s.metered {
        NM_METERED_YES => ", metered",
        NM_METERED_GUESS_YES => ", metered (guessed)",
        _ => "",
    };
    let medium = match s.kind.as_str() {
        "802-11-wireless" => NM_DEVICE_WIFI,
        "802-3-ethernet" | "pppoe" => NM_DEVICE_ETHERNET,
        "gsm" | "cdma" | "bluetooth" => NM_DEVICE_MODEM,
        // A VPN, a bridge or a bond: what carries it decides. A veth is a container's or
        // a virtual machine's wired link; Bluetooth is a phone's tethering.
        _ => SEEN_THROUGH
            .into_iter()
            .find(|t| s.devices.contains(t))
            .map(|t| match t {
                NM_DEVICE_VETH => NM_DEVICE_ETHERNET,
                NM_DEVICE_BT => NM_DEVICE_MODEM,
                t => t,
            })
            .unwrap_or(0),
    };
    if medium == NM_DEVICE_ETHERNET && s.tethered {
        let mut c = state(LinkClass::Cellular, "a phone's USB tethering".into());
        c.detail.push_str(limited);
        return c;
    }
    if medium == 0 {
        // A tunnel goes where what carries it goes: the most restrictive of the other
        // activated connections decides, so a WireGuard over EDGE is still EDGE (and
        // a tunnel said to be metered is at least metered).
        if let Some(carrier) = s
            .under
            .iter()
            .map(classify)
            .filter(|c| c.class != LinkClass::Offline && c.class != LinkClass::Unknown)
            .min_by_key(|c| restrictiveness(c.class))
        {
            let class = if metered
                && restrictiveness(LinkClass::Metered) < restrictiveness(carrier.class)
            {
                LinkClass::Metered
            } else {
                carrier.class
            };
            return state(
                class,
                format!("{} over {}{metered_words}{limited}", s.kind, carrier.detail),
            );
        }
    }
    let mut classified = match medium {
        NM_DEVICE_MODEM => match s.access {
            Some(a) if a & MM_FAST != 0 => state(LinkClass::Cellular, access_words(a)),
            Some(a) if a & MM_SLOW != 0 => state(LinkClass::TwoG, access_words(a)),
            // ModemManager has not named the technology (registering, restarting, not
            // answering): it may be EDGE, so files wait for its word.
            _ if s.mm_modem => state(
                LinkClass::TwoG,
                "cellular, technology not named by ModemManager yet".to_owned(),
            ),
            _ => state(
                LinkClass::Cellular,
                "cellular, generation unknown".to_owned(),
            ),
        },
        NM_DEVICE_WIFI if metered => state(LinkClass::Metered, format!("Wi-Fi{metered_words}")),
        NM_DEVICE_WIFI => state(LinkClass::Wifi, "Wi-Fi".into()),
        NM_DEVICE_ETHERNET if metered => {
            state(LinkClass::Metered, format!("Ethernet{metered_words}"))
        }
        NM_DEVICE_ETHERNET => state(LinkClass::Ethernet, "Ethernet".into()),
        // A connection on something the watcher does not know (a tunnel, a modem
        // NetworkManager does not drive): metered if it says so, and otherwise nothing
        // vouches for it, so files wait when they are for Wi-Fi only.
        _ if metered => state(LinkClass::Metered, format!("{}{metered_words}", s.kind)),
        _ if s.kind.is_empty() => state(LinkClass::Unknown, "connection of unknown type".into()),
        _ => state(LinkClass::Unknown, format!("{} connection", s.kind)),
    };
    classified.detail.push_str(limited);
    classified
}

/// Lower is more restrictive for files.
fn restrictiveness(class: LinkClass) -> u8 {
    match class {
        LinkClass::Offline => 0,
        LinkClass::TwoG => 1,
        LinkClass::Cellular => 2,
        LinkClass::Metered => 3,
        LinkClass::Unknown => 4,
        LinkClass::Ethernet | LinkClass::Wifi => 5,
    }
}

/// The fastest technology in `bits`, the way a phone's status bar names it.
fn access_words(bits: u32) -> String {
    const NAMES: [(u32, &str); 12] = [
        (1 << 15, "5G"),
        (1 << 14, "LTE"),
        (1 << 16, "LTE Cat-M"),
        (1 << 9, "HSPA+"),
        (1 << 8, "HSPA"),
        (0b11 << 6, "HSDPA/HSUPA"),
        (1 << 5, "UMTS"),
        (0b111 << 11, "EV-DO"),
        (MM_LTE_NB_IOT, "NB-IoT"),
        (MM_EDGE, "EDGE"),
        (MM_GPRS, "GPRS"),
        (MM_GSM | MM_GSM_COMPACT | MM_1XRTT, "2G"),
    ];
    NAMES
        .iter()
        .find(|(b, _)| bits & b != 0)
        .map(|(_, n)| (*n).to_owned())
        .unwrap_or_else(|| "cellular".to_owned())
}

/// Follows NetworkManager until `shutdown`, through the bus or NetworkManager going
/// away and coming back.
pub(super) async fn follow(
    tx: watch::Sender<LinkState>,
    shutdown: CancellationToken,
    (retry_min, retry_max): (Duration, Duration),
) {
    let mut fallback = Fallback::default();
    let mut delay = retry_min;
    loop {
        let connect = async {
            zbus::connection::Builder::system()?
                // A NetworkManager that hangs must not hang the watcher with it.
                .method_timeout(CALL_TIMEOUT)
                .build()
                .await
        };
        let connected = tokio::select! {
            _ = shutdown.cancelled() => return,
            c = tokio::time::timeout(CALL_TIMEOUT, connect) => {
                c.unwrap_or_else(|_| Err(zbus::Error::Failure("the system bus does not answer".into())))
            }
        };
        match connected {
            Ok(conn) => {
                delay = retry_min;
                match watch_bus(&conn, &tx, &shutdown, &mut fallback).await {
                    None => return,
                    Some(why) => fallback.enter(&tx, format!("the system bus went away ({why})")),
                }
            }
            Err(e) => fallback.enter(&tx, format!("no system bus ({e})")),
        }
        // The bus has no signal for "I am back": try again now and then. The uplink
        // meanwhile tries the broker on its own.
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(retry_max);
    }
}

/// Says once, not at every retry, that the daemon is on its own.
#[derive(Default)]
struct Fallback {
    active: bool,
}

impl Fallback {
    fn enter(&mut self, tx: &watch::Sender<LinkState>, why: String) {
        if !self.active {
            tracing::warn!(reason = %why, "not following NetworkManager: the broker is tried whatever the link, and photos go on any link unless \"Wi-Fi only for files\" is on");
            self.active = true;
        }
        let state = LinkState::unknown(why);
        tx.send_if_modified(|s| {
            let state = hold_while_away(s, state);
            replace_if_changed(s, state)
        });
    }

    fn leave(&mut self, state: &LinkState) {
        if self.active {
            tracing::info!(link = state.class.as_str(), detail = %state.detail, "following NetworkManager");
            self.active = false;
        }
    }
}

/// While NetworkManager is away (restarting, crashed, the bus gone) or starting, the
/// link it last named is still there: a modem on EDGE does not become a link for photos
/// because nobody can say so for a moment. A class that holds files back stays until
/// NetworkManager says otherwise; records go on every class but offline anyway.
fn hold_while_away(current: &LinkState, new: LinkState) -> LinkState {
    let restrictive = matches!(
        current.class,
        LinkClass::TwoG | LinkClass::Cellular | LinkClass::Metered
    );
    if new.class != LinkClass::Unknown
        || current.source != LinkSource::NetworkManager
        || !restrictive
    {
        return new;
    }
    held(current, &new.detail)
}

/// `current` kept, its detail saying why (once, however often it is kept again).
fn held(current: &LinkState, why: &str) -> LinkState {
    let last = current
        .detail
        .split(" (as last seen; ")
        .next()
        .unwrap_or(&current.detail);
    LinkState {
        detail: format!("{last} (as last seen; {why})"),
        ..current.clone()
    }
}

/// A read that missed part of the state may tighten the class (a link going down is
/// news to act on) but never loosen it: what it could not read may be the EDGE modem
/// or the metered device that holds files back.
fn hold_unless_tighter(current: &LinkState, new: LinkState) -> LinkState {
    if current.source == LinkSource::NetworkManager
        && restrictiveness(new.class) > restrictiveness(current.class)
    {
        return held(current, "part of the state could not be read");
    }
    new
}

fn replace_if_changed(current: &mut LinkState, new: LinkState) -> bool {
    if *current == new {
        return false;
    }
    if current.class != new.class || current.connection != new.connection {
        tracing::info!(
            link = new.class.as_str(),
            detail = %new.detail,
            was = current.class.as_str(),
            "link changed"
        );
    }
    *current = new;
    true
}

/// Watches one bus connection; returns `None` on shutdown, or why the bus was lost.
async fn watch_bus(
    conn: &Connection,
    tx: &watch::Sender<LinkState>,
    shutdown: &CancellationToken,
    fallback: &mut Fallback,
) -> Option<String> {
    // Subscribed before the first read, so that no change falls between the two.
    let streams = match subscribe(conn).await {
        Ok(s) => s,
        Err(e) => return Some(e.to_string()),
    };
    let wake = Arc::new(Notify::new());
    let (gone_tx, mut gone) = mpsc::channel::<()>(1);
    let mut forwarders = tokio::task::JoinSet::new();
    for mut stream in streams {
        let wake = wake.clone();
        let gone_tx = gone_tx.clone();
        // Each stream is emptied at once: zbus stops reading the socket while a
        // stream's queue is full, and the reads below need the socket.
        forwarders.spawn(async move {
            while let Some(msg) = stream.next().await {
                match msg {
                    Ok(msg) if worth_a_read(&msg) => wake.notify_one(),
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
            let _ = gone_tx.send(()).await;
        });
    }
    drop(gone_tx);
    loop {
        let failed = match read(conn).await {
            Ok(Some(snapshot)) => {
                let state = classify(&snapshot);
                fallback.leave(&state);
                let starting = snapshot.starting;
                let incomplete = snapshot.incomplete;
                tx.send_if_modified(|s| {
                    // Both: NetworkManager and ModemManager may restart together.
                    let state = if starting {
                        hold_while_away(s, state)
                    } else {
                        state
                    };
                    let state = if incomplete {
                        hold_unless_tighter(s, state)
                    } else {
                        state
                    };
                    replace_if_changed(s, state)
                });
                if incomplete {
                    tracing::debug!("part of NetworkManager's or ModemManager's state could not be read; reading again");
                }
                incomplete
            }
            Ok(None) => {
                fallback.enter(tx, "NetworkManager is not on the system bus".into());
                false
            }
            Err(e) => {
                fallback.enter(tx, format!("cannot read NetworkManager's state: {e}"));
                true
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => return None,
            _ = gone.recv() => return Some("connection closed".into()),
            _ = wake.notified() => settle(&wake).await,
            // Only after a failure: a NetworkManager that answered badly may send no
            // signal to say it is well again.
            _ = tokio::time::sleep(REREAD), if failed => {}
        }
    }
}

/// Returns once the signals of a change have stopped coming (see [`SETTLE`]).
async fn settle(wake: &Notify) {
    let deadline = tokio::time::Instant::now() + SETTLE_AT_MOST;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(SETTLE) => return,
            _ = tokio::time::sleep_until(deadline) => return,
            _ = wake.notified() => {}
        }
    }
}

async fn subscribe(conn: &Connection) -> zbus::Result<Vec<MessageStream>> {
    // NetworkManager's main object announces every change of the primary connection,
    // its type, the state, connectivity and metering; its other objects (access points,
    // IP configs, statistics) chatter and are left out.
    let network_manager = MatchRule::builder()
        .msg_type(zbus::message::Type::Signal)
        .interface("org.freedesktop.DBus.Properties")?
        .member("PropertiesChanged")?
        .path(NM_PATH)?
        .arg(0, NM)?
        .build();
    let owner = |name: &'static str| -> zbus::Result<MatchRule<'static>> {
        Ok(MatchRule::builder()
            .msg_type(zbus::message::Type::Signal)
            .interface("org.freedesktop.DBus")?
            .member("NameOwnerChanged")?
            .arg(0, name)?
            .build())
    };
    let modems = MatchRule::builder()
        .msg_type(zbus::message::Type::Signal)
        .interface("org.freedesktop.DBus.Properties")?
        .member("PropertiesChanged")?
        .path_namespace(MM_PATH)?
        .arg(0, MM_MODEM)?
        .build();
    let mut streams = Vec::new();
    for rule in [owner(NM)?, owner(MM)?, network_manager, modems] {
        streams.push(MessageStream::for_match_rule(rule, conn, Some(64)).await?);
    }
    Ok(streams)
}

type Props = HashMap<String, OwnedValue>;

/// Whether a signal may change the class: a name coming or going always may; a
/// `PropertiesChanged` only when it names a property in [`NM_KEYS`] or [`MM_KEYS`].
fn worth_a_read(msg: &zbus::Message) -> bool {
    let header = msg.header();
    if header.member().map(|m| m.as_str()) != Some("PropertiesChanged") {
        return true;
    }
    let Ok((iface, changed, invalidated)) =
        msg.body()
            .deserialize::<(String, HashMap<String, OwnedValue>, Vec<String>)>()
    else {
        // Malformed: read, rather than guess what it meant.
        return true;
    };
    let keys: &[&str] = match iface.as_str() {
        NM => &NM_KEYS,
        MM_MODEM => &MM_KEYS,
        _ => return false,
    };
    changed
        .keys()
        .chain(invalidated.iter())
        .any(|k| keys.contains(&k.as_str()))
}

async fn get_all(conn: &Connection, dest: &str, path: &str, iface: &str) -> zbus::Result<Props> {
    let reply = conn
        .call_method(
            Some(dest),
            path,
            Some("org.freedesktop.DBus.Properties"),
            "GetAll",
            &(iface,),
        )
        .await?;
    reply.body().deserialize()
}

async fn has_owner(conn: &Connection, name: &str) -> zbus::Result<bool> {
    let reply = conn
        .call_method(
            Some("org.freedesktop.DBus"),
            "/org/freedesktop/DBus",
            Some("org.freedesktop.DBus"),
            "NameHasOwner",
            &(name,),
        )
        .await?;
    reply.body().deserialize()
}

fn prop_u32(p: &Props, key: &str) -> Option<u32> {
    p.get(key).and_then(|v| u32::try_from(v).ok())
}

fn prop_str(p: &Props, key: &str) -> Option<String> {
    p.get(key)
        .and_then(|v| <&str>::try_from(v).ok())
        .map(str::to_owned)
}

fn prop_bool(p: &Props, key: &str) -> bool {
    p.get(key)
        .and_then(|v| bool::try_from(v).ok())
        .unwrap_or(false)
}

fn prop_path(p: &Props, key: &str) -> Option<String> {
    p.get(key)
        .and_then(|v| match &**v {
            Value::ObjectPath(o) => Some(o.to_string()),
            _ => None,
        })
        .filter(|o| o != "/")
}

fn prop_paths(p: &Props, key: &str) -> Vec<String> {
    match p.get(key).map(|v| &**v) {
        Some(Value::Array(a)) => a
            .inner()
            .iter()
            .filter_map(|v| match v {
                Value::ObjectPath(o) => Some(o.to_string()),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// Reads what [`classify`] needs; `None` when NetworkManager is not on the bus. Objects
/// that vanish between the calls count as absent: the signal of their going follows.
async fn read(conn: &Connection) -> zbus::Result<Option<Snapshot>> {
    if !has_owner(conn, NM).await? {
        return Ok(None);
    }
    let nm = get_all(conn, NM, NM_PATH, NM).await?;
    let mut snap = Snapshot {
        state: prop_u32(&nm, "State").unwrap_or(0),
        starting: prop_bool(&nm, "Startup"),
        // Missing (or "unknown", while NetworkManager starts or stops): no word either way.
        connectivity: prop_u32(&nm, "Connectivity").unwrap_or(0),
        metered: prop_u32(&nm, "Metered").unwrap_or(0),
        kind: prop_str(&nm, "PrimaryConnectionType").unwrap_or_default(),
        ..Snapshot::default()
    };
    snap.primary = prop_path(&nm, "PrimaryConnection");
    if snap.primary.is_none() && snap.state >= NM_STATE_CONNECTED_SITE {
        // Older NetworkManager, or a moment between changes: the default route's
        // connection is the one the broker's traffic takes. Any other (loopback, a
        // connection without a route out) says nothing about it: without one the
        // class is unknown until the next signal.
        for path in prop_paths(&nm, "ActiveConnections") {
            if let Ok(ac) = get_all(conn, NM, &path, NM_ACTIVE).await {
                if prop_bool(&ac, "Default") || prop_bool(&ac, "Default6") {
                    snap.primary = Some(path);
                    break;
                }
            }
        }
    }
    let Some(primary) = snap.primary.clone() else {
        return Ok(Some(snap));
    };
    let Ok(active) = get_all(conn, NM, &primary, NM_ACTIVE).await else {
        snap.incomplete = true;
        return Ok(Some(snap));
    };
    if snap.kind.is_empty() {
        snap.kind = prop_str(&active, "Type").unwrap_or_default();
    }
    snap.primary_activated = prop_u32(&active, "State") == Some(NM_ACTIVE_CONNECTION_ACTIVATED);
    read_devices(conn, &active, &mut snap).await;
    let sees_through = matches!(
        snap.kind.as_str(),
        "802-11-wireless" | "802-3-ethernet" | "pppoe" | "gsm" | "cdma" | "bluetooth"
    ) || snap.devices.iter().any(|d| SEEN_THROUGH.contains(d));
    if !sees_through {
        for path in prop_paths(&nm, "ActiveConnections") {
            if path == primary {
                continue;
            }
            let Ok(other) = get_all(conn, NM, &path, NM_ACTIVE).await else {
                snap.incomplete = true;
                continue;
            };
            if prop_u32(&other, "State") != Some(NM_ACTIVE_CONNECTION_ACTIVATED) {
                continue;
            }
            let mut under = Snapshot {
                state: snap.state,
                connectivity: NM_CONNECTIVITY_FULL,
                primary: Some(path),
                primary_activated: true,
                kind: prop_str(&other, "Type").unwrap_or_default(),
                ..Snapshot::default()
            };
            read_devices(conn, &other, &mut under).await;
            snap.incomplete |= under.incomplete;
            snap.under.push(under);
        }
    }
    Ok(Some(snap))
}

/// The device types of an active connection (and what carries a bridge, bond or VLAN),
/// a modem's access technologies, whether an Ethernet device is a phone's tethering,
/// and whether a device is metered: NetworkManager's global `Metered` is the primary
/// connection's device's alone, and says nothing of the link under a tunnel.
async fn read_devices(conn: &Connection, active: &Props, snap: &mut Snapshot) {
    for device in prop_paths(active, "Devices") {
        let Ok(d) = get_all(conn, NM, &device, NM_DEVICE).await else {
            snap.incomplete = true;
            continue;
        };
        let kind = prop_u32(&d, "DeviceType").unwrap_or(0);
        snap.devices.push(kind);
        if let Some(m @ (NM_METERED_YES | NM_METERED_GUESS_YES)) = prop_u32(&d, "Metered") {
            if !matches!(snap.metered, NM_METERED_YES | NM_METERED_GUESS_YES) {
                snap.metered = m;
            }
        }
        // What carries a bridge, a bond or a VLAN decides its class: their devices are
        // listed after it.
        for carrier in carriers(conn, &device, kind, &d).await {
            if let Ok(c) = get_all(conn, NM, &carrier, NM_DEVICE).await {
                snap.devices.push(prop_u32(&c, "DeviceType").unwrap_or(0));
            }
        }
        if kind == NM_DEVICE_MODEM && snap.access.is_none() {
            // NetworkManager names a ModemManager modem by its object path.
            if let Some(udi) = prop_str(&d, "Udi").filter(|u| u.starts_with(MM_PATH)) {
                snap.mm_modem = true;
                match get_all(conn, MM, &udi, MM_MODEM).await {
                    Ok(m) => snap.access = prop_u32(&m, "AccessTechnologies"),
                    Err(_) => snap.incomplete = true,
                }
            }
        }
        if kind == NM_DEVICE_ETHERNET
            && prop_str(&d, "Driver").is_some_and(|drv| TETHERING_DRIVERS.contains(&drv.as_str()))
        {
            snap.tethered = true;
        }
    }
}

/// The devices under a device that rides on others: a bridge's, bond's or team's ports
/// (`Ports`, NetworkManager 1.34 and later), a VLAN's or macvlan's parent. One level:
/// a VLAN on a bond on Ethernet stays unknown.
async fn carriers(conn: &Connection, device: &str, kind: u32, props: &Props) -> Vec<String> {
    let iface = match kind {
        NM_DEVICE_BOND | NM_DEVICE_BRIDGE | NM_DEVICE_TEAM => return prop_paths(props, "Ports"),
        NM_DEVICE_VLAN => "org.freedesktop.NetworkManager.Device.Vlan",
        NM_DEVICE_MACVLAN => "org.freedesktop.NetworkManager.Device.Macvlan",
        _ => return Vec::new(),
    };
    match get_all(conn, NM, device, iface).await {
        Ok(p) => prop_path(&p, "Parent").into_iter().collect(),
        Err(_) => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_burst_of_signals_is_read_once_it_is_over() {
        let wake = Arc::new(Notify::new());
        let sent = Arc::new(std::sync::Mutex::new(Vec::new()));
        let signals = {
            let (wake, sent) = (wake.clone(), sent.clone());
            tokio::spawn(async move {
                // One signal per property, as real NetworkManager sends a change.
                for _ in 0..5 {
                    tokio::time::sleep(Duration::from_millis(15)).await;
                    sent.lock().unwrap().push(tokio::time::Instant::now());
                    wake.notify_one();
                }
            })
        };
        let start = tokio::time::Instant::now();
        settle(&wake).await;
        let read_at = tokio::time::Instant::now();
        signals.await.unwrap();
        let sent = sent.lock().unwrap();
        let last_before = sent.iter().filter(|t| **t <= read_at).max().copied();
        let quiet_since = last_before.unwrap_or(start);
        assert!(
            read_at - quiet_since >= SETTLE || read_at - start >= SETTLE_AT_MOST,
            "read {:?} after the last signal",
            read_at - quiet_since
        );
    }

    fn online(kind: &str, metered: u32, devices: &[u32], access: Option<u32>) -> Snapshot {
        Snapshot {
            state: 70,
            starting: false,
            connectivity: 4,
            primary: Some("/org/freedesktop/NetworkManager/ActiveConnection/1".into()),
            primary_activated: true,
            kind: kind.into(),
            metered,
            devices: devices.to_vec(),
            access,
            ..Snapshot::default()
        }
    }

    /// A restart of NetworkManager on EDGE keeps photos back: the last class it named
    /// holds until it names another.
    #[test]
    fn a_restrictive_class_holds_while_network_manager_is_away() {
        let edge = classify(&online("gsm", 0, &[8], Some(MM_EDGE)));
        assert_eq!(edge.class, LinkClass::TwoG);
        let away = hold_while_away(
            &edge,
            LinkState::unknown("NetworkManager is not on the system bus"),
        );
        assert_eq!(away.class, LinkClass::TwoG);
        assert!(
            away.detail.contains("EDGE") && away.detail.contains("not on the system bus"),
            "{}",
            away.detail
        );
        let again = hold_while_away(
            &away,
            LinkState::unknown("cannot read NetworkManager's state: timeout"),
        );
        assert_eq!(
            again.detail.matches("as last seen").count(),
            1,
            "{}",
            again.detail
        );
        let wifi = classify(&online("802-11-wireless", 4, &[2], None));
        assert_eq!(
            hold_while_away(&wifi, LinkState::unknown("gone")).class,
            LinkClass::Unknown
        );
        assert_eq!(
            hold_while_away(&away, wifi.clone()),
            wifi,
            "NetworkManager's word replaces it"
        );
    }

    /// A modem ModemManager drives but whose technology it has not named (registering,
    /// or its answer lost) may be on EDGE: files wait. One it does not drive (no
    /// ModemManager object) has nobody to ask, and counts as cellular.
    #[test]
    fn a_modem_modemmanager_has_not_named_holds_files_back() {
        let unnamed = |access| Snapshot {
            mm_modem: true,
            ..online("gsm", 1, &[8], access)
        };
        assert_eq!(classify(&unnamed(None)).class, LinkClass::TwoG);
        assert_eq!(classify(&unnamed(Some(0))).class, LinkClass::TwoG);
        assert_eq!(classify(&unnamed(Some(1 << 14))).class, LinkClass::Cellular);
        assert_eq!(
            classify(&online("gsm", 1, &[8], None)).class,
            LinkClass::Cellular
        );
    }

    /// NetworkManager's NM_STATE_UNKNOWN (also what a missing `State` reads as) says
    /// nothing of the link: not offline.
    #[test]
    fn an_unknown_network_manager_state_is_not_offline() {
        let s = Snapshot {
            state: 0,
            ..Snapshot::default()
        };
        assert_eq!(classify(&s).class, LinkClass::Unknown);
    }

    /// A read that missed part of the state may tighten the class, never loosen it.
    #[test]
    fn an_incomplete_read_never_loosens_the_class() {
        let edge = classify(&online("gsm", 1, &[8], Some(MM_EDGE)));
        let lte = classify(&online("gsm", 1, &[8], Some(1 << 14)));
        let wifi = classify(&online("802-11-wireless", 4, &[2], None));
        let kept = hold_unless_tighter(&edge, lte.clone());
        assert_eq!(kept.class, LinkClass::TwoG);
        assert!(kept.detail.contains("could not be read"), "{}", kept.detail);
        assert_eq!(hold_unless_tighter(&wifi, edge.clone()), edge);
        let offline = LinkState {
            class: LinkClass::Offline,
            ..edge.clone()
        };
        assert_eq!(hold_unless_tighter(&lte, offline.clone()), offline);
    }

    /// ModemManager restarting on EDGE (its modem unanswered, the read incomplete): the
    /// modem stays 2G for files, under a tunnel too, until it names a technology again.
    #[test]
    fn a_modem_on_2g_stays_2g_while_its_technology_is_unknown() {
        let unsure = Snapshot {
            mm_modem: true,
            incomplete: true,
            ..online("gsm", 0, &[8], None)
        };
        assert_eq!(classify(&unsure).class, LinkClass::TwoG);
        let tunnel = Snapshot {
            under: vec![unsure.clone()],
            ..online("wireguard", 4, &[29], None)
        };
        assert_eq!(classify(&tunnel).class, LinkClass::TwoG);
        let named = Snapshot {
            access: Some(1 << 14),
            incomplete: false,
            ..unsure
        };
        assert_eq!(classify(&named).class, LinkClass::Cellular);
    }

    #[test]
    fn classes_from_what_network_manager_says() {
        use LinkClass::*;
        let table: &[(Snapshot, LinkClass, &str)] = &[
            (
                Snapshot {
                    state: 20,
                    ..Snapshot::default()
                },
                Offline,
                "disconnected",
            ),
            (
                Snapshot {
                    state: 50,
                    connectivity: 3,
                    ..Snapshot::default()
                },
                Unknown,
                "local only",
            ),
            (
                Snapshot {
                    state: 30,
                    connectivity: 4,
                    ..Snapshot::default()
                },
                Offline,
                "disconnecting, the check's answer stale",
            ),
            (
                Snapshot {
                    state: 40,
                    connectivity: 4,
                    ..Snapshot::default()
                },
                Offline,
                "connecting, the check's answer stale",
            ),
            (
                Snapshot {
                    state: 20,
                    connectivity: 1,
                    ..Snapshot::default()
                },
                Offline,
                "disconnected, the check agrees",
            ),
            (
                Snapshot {
                    state: 20,
                    connectivity: 4,
                    ..Snapshot::default()
                },
                Unknown,
                "a link NetworkManager does not manage",
            ),
            (
                Snapshot {
                    state: 20,
                    connectivity: 3,
                    ..Snapshot::default()
                },
                Unknown,
                "an unmanaged link, limited",
            ),
            (
                Snapshot {
                    state: 60,
                    connectivity: 3,
                    ..online("802-3-ethernet", 4, &[1], None)
                },
                Ethernet,
                "limited",
            ),
            (
                Snapshot {
                    connectivity: 2,
                    ..online("802-11-wireless", 4, &[2], None)
                },
                Wifi,
                "portal",
            ),
            (
                Snapshot {
                    connectivity: 2,
                    ..online("gsm", 0, &[8], Some(MM_EDGE))
                },
                TwoG,
                "a carrier's redirect on EDGE",
            ),
            (
                Snapshot {
                    state: 40,
                    connectivity: 3,
                    ..online("802-11-wireless", 4, &[2], None)
                },
                Wifi,
                "connecting beside a working Wi-Fi",
            ),
            (
                Snapshot {
                    state: 40,
                    connectivity: 3,
                    primary_activated: false,
                    ..online("802-11-wireless", 4, &[2], None)
                },
                Offline,
                "the primary connection still coming up",
            ),
            (
                Snapshot {
                    state: 20,
                    starting: true,
                    ..Snapshot::default()
                },
                Unknown,
                "starting",
            ),
            (
                Snapshot {
                    state: 60,
                    connectivity: 1,
                    ..online("802-11-wireless", 4, &[2], None)
                },
                Wifi,
                "the first check has not answered",
            ),
            (
                Snapshot {
                    connectivity: 0,
                    ..online("802-11-wireless", 4, &[2], None)
                },
                Wifi,
                "no check",
            ),
            (
                online("802-11-wireless", 4, &[2], None),
                Wifi,
                "wifi guess-no",
            ),
            (online("802-11-wireless", 2, &[2], None), Wifi, "wifi no"),
            (
                online("802-11-wireless", 1, &[2], None),
                Metered,
                "wifi yes",
            ),
            (
                online("802-11-wireless", 3, &[2], None),
                Metered,
                "wifi guess-yes",
            ),
            (
                online("802-3-ethernet", 0, &[1], None),
                Ethernet,
                "ethernet",
            ),
            (
                online("802-3-ethernet", 3, &[1], None),
                Metered,
                "ethernet guess-yes",
            ),
            (online("gsm", 1, &[8], Some(MM_EDGE)), TwoG, "edge"),
            (online("gsm", 1, &[8], Some(MM_GPRS)), TwoG, "gprs"),
            (online("gsm", 1, &[8], Some(MM_LTE_NB_IOT)), TwoG, "nb-iot"),
            (online("gsm", 1, &[8], Some(1 << 14)), Cellular, "lte"),
            (
                online("gsm", 1, &[8], Some((1 << 14) | MM_EDGE)),
                Cellular,
                "lte and edge",
            ),
            (online("gsm", 1, &[8], Some(1 << 5)), Cellular, "umts"),
            (
                online("gsm", 2, &[8], Some(1 << 15)),
                Cellular,
                "5g, unmetered apn",
            ),
            (online("gsm", 1, &[8], None), Cellular, "no modemmanager"),
            (online("bluetooth", 0, &[5], None), Cellular, "tethered"),
            (online("vpn", 0, &[8], Some(MM_EDGE)), TwoG, "vpn over edge"),
            (online("vpn", 0, &[2], None), Wifi, "vpn over wifi"),
            (
                online("vpn", 0, &[5], None),
                Cellular,
                "vpn over Bluetooth tethering",
            ),
            (online("", 0, &[2], None), Wifi, "type from the device"),
            (
                online("wireguard", 1, &[], None),
                Metered,
                "unknown, metered",
            ),
            (online("wireguard", 4, &[29], None), Unknown, "tunnel"),
            (
                Snapshot {
                    under: vec![
                        online("802-11-wireless", 4, &[2], None),
                        online("gsm", 1, &[8], Some(MM_EDGE)),
                    ],
                    ..online("wireguard", 4, &[29], None)
                },
                TwoG,
                "a tunnel while both Wi-Fi and EDGE are up: the more restrictive",
            ),
            (
                Snapshot {
                    under: vec![online("802-11-wireless", 4, &[2], None)],
                    ..online("wireguard", 1, &[29], None)
                },
                Metered,
                "a metered tunnel over Wi-Fi",
            ),
            (
                Snapshot {
                    under: vec![online("802-11-wireless", 4, &[2], None)],
                    ..online("wireguard", 4, &[29], None)
                },
                Wifi,
                "a tunnel over Wi-Fi",
            ),
            (
                Snapshot {
                    // The Wi-Fi device's own Metered (a phone's hotspot), read because
                    // the global one is the tunnel's.
                    under: vec![online("802-11-wireless", 3, &[2], None)],
                    ..online("wireguard", 4, &[29], None)
                },
                Metered,
                "a tunnel over a phone's hotspot",
            ),
            (
                Snapshot {
                    tethered: true,
                    ..online("802-3-ethernet", 4, &[1], None)
                },
                Cellular,
                "a phone's USB tethering",
            ),
            (online("generic", 0, &[14], None), Unknown, "generic"),
            (
                online("bridge", 0, &[NM_DEVICE_BRIDGE, NM_DEVICE_ETHERNET], None),
                Ethernet,
                "a bridge over Ethernet",
            ),
            (
                online("macvlan", 1, &[NM_DEVICE_MACVLAN, NM_DEVICE_ETHERNET], None),
                Metered,
                "a metered macvlan over Ethernet",
            ),
            (
                online("bridge", 0, &[NM_DEVICE_BRIDGE, NM_DEVICE_VETH], None),
                Ethernet,
                "a bridge over a veth",
            ),
            (
                online("bond", 0, &[NM_DEVICE_BOND], None),
                Unknown,
                "a bond without ports",
            ),
            (online("", 0, &[], None), Unknown, "no primary connection"),
        ];
        for (snapshot, class, case) in table {
            let state = classify(snapshot);
            assert_eq!(state.class, *class, "{case}: {state:?}");
            assert_eq!(state.source, LinkSource::NetworkManager);
        }
        assert_eq!(
            classify(&online("gsm", 1, &[8], Some(MM_EDGE))).detail,
            "EDGE"
        );
        assert_eq!(
            classify(&online("gsm", 1, &[8], Some(1 << 14))).detail,
            "LTE"
        );
        assert_eq!(
            classify(&online("802-11-wireless", 3, &[2], None)).detail,
            "Wi-Fi, metered (guessed)"
        );
        // Real NetworkManager says "limited" for a network without a gateway.
        assert_eq!(
            classify(&Snapshot {
                state: 50,
                connectivity: 3,
                ..Snapshot::default()
            })
            .detail,
            "local network only"
        );
        assert_eq!(
            classify(&Snapshot {
                state: 60,
                connectivity: 3,
                ..online("802-3-ethernet", 4, &[1], None)
            })
            .detail,
            "Ethernet, limited connectivity"
        );
    }
}
