//! Self-test of the NetworkManager/ModemManager harness (`fieldsync_tests::netmock`), not
//! of the daemon: what a link watcher would read and hear on the private bus, read back
//! through zbus from a connection of its own.

use std::collections::HashMap;
use std::time::Duration;

use fieldsync_tests::netmock::*;
use zbus::export::futures_core::Stream;
use zbus::message::Type as MessageType;
use zbus::names::{BusName, InterfaceName};
use zbus::zvariant::{OwnedObjectPath, OwnedValue};
use zbus::{Connection, MatchRule, Message, MessageStream};

type Props = HashMap<String, OwnedValue>;

async fn connect(mock: &NetMock) -> Connection {
    zbus::connection::Builder::address(mock.address().as_str())
        .expect("a valid bus address")
        .build()
        .await
        .unwrap_or_else(|e| panic!("connect to {}: {e}", mock.address()))
}

async fn try_props(conn: &Connection, dest: &str, path: &str, iface: &str) -> zbus::Result<Props> {
    let proxy = zbus::fdo::PropertiesProxy::builder(conn)
        .destination(dest.to_owned())?
        .path(path.to_owned())?
        .build()
        .await?;
    let iface = InterfaceName::try_from(iface.to_owned()).expect("a valid interface name");
    Ok(proxy.get_all(iface).await?)
}

async fn props(conn: &Connection, dest: &str, path: &str, iface: &str) -> Props {
    try_props(conn, dest, path, iface)
        .await
        .unwrap_or_else(|e| panic!("GetAll {iface} on {dest} {path}: {e}"))
}

fn get<'a>(props: &'a Props, name: &str) -> &'a OwnedValue {
    props
        .get(name)
        .unwrap_or_else(|| panic!("no property {name} in {props:?}"))
}

fn u32_of(props: &Props, name: &str) -> u32 {
    u32::try_from(get(props, name)).unwrap_or_else(|e| panic!("{name} is not a u: {e}"))
}

fn i32_of(props: &Props, name: &str) -> i32 {
    i32::try_from(get(props, name)).unwrap_or_else(|e| panic!("{name} is not an i: {e}"))
}

fn bool_of(props: &Props, name: &str) -> bool {
    bool::try_from(get(props, name)).unwrap_or_else(|e| panic!("{name} is not a b: {e}"))
}

fn str_of(props: &Props, name: &str) -> String {
    String::try_from(get(props, name).try_clone().expect("no fds"))
        .unwrap_or_else(|e| panic!("{name} is not an s: {e}"))
}

fn path_of(props: &Props, name: &str) -> String {
    OwnedObjectPath::try_from(get(props, name).try_clone().expect("no fds"))
        .unwrap_or_else(|e| panic!("{name} is not an o: {e}"))
        .to_string()
}

fn paths_of(props: &Props, name: &str) -> Vec<String> {
    Vec::<OwnedObjectPath>::try_from(get(props, name).try_clone().expect("no fds"))
        .unwrap_or_else(|e| panic!("{name} is not an ao: {e}"))
        .into_iter()
        .map(|p| p.to_string())
        .collect()
}

async fn has_owner(conn: &Connection, name: &'static str) -> bool {
    zbus::fdo::DBusProxy::new(conn)
        .await
        .expect("bus proxy")
        .name_has_owner(BusName::try_from(name).expect("a valid name"))
        .await
        .expect("NameHasOwner")
}

/// Reads everything a watcher reads, the way it reads it (the modem through the modem
/// device's `Udi`), and checks it shows `link`. Returns the primary connection's path.
async fn assert_shows(conn: &Connection, link: MockLink) -> String {
    let nm = props(conn, NM_NAME, NM_PATH, NM_IFACE).await;
    assert_eq!(
        paths_of(&nm, "Devices"),
        [ETHERNET_DEVICE, WIFI_DEVICE, MODEM_DEVICE],
        "{link:?}"
    );
    let primary = path_of(&nm, "PrimaryConnection");
    let (conn_type, metered, device, device_type, tech) = match link {
        MockLink::Offline => {
            assert_eq!(u32_of(&nm, "State"), NM_STATE_DISCONNECTED);
            assert_eq!(u32_of(&nm, "Connectivity"), NM_CONNECTIVITY_NONE);
            assert_eq!(primary, "/");
            assert_eq!(str_of(&nm, "PrimaryConnectionType"), "");
            assert_eq!(paths_of(&nm, "ActiveConnections"), Vec::<String>::new());
            assert_eq!(u32_of(&nm, "Metered"), NM_METERED_UNKNOWN);
            let modem = props(conn, MM_NAME, MODEM_PATH, MODEM_IFACE).await;
            assert_ne!(i32_of(&modem, "State"), MM_MODEM_STATE_CONNECTED);
            return primary;
        }
        MockLink::Edge => (
            "gsm",
            NM_METERED_YES,
            MODEM_DEVICE,
            NM_DEVICE_TYPE_MODEM,
            MM_ACCESS_TECHNOLOGY_EDGE,
        ),
        MockLink::Lte => (
            "gsm",
            NM_METERED_YES,
            MODEM_DEVICE,
            NM_DEVICE_TYPE_MODEM,
            MM_ACCESS_TECHNOLOGY_LTE,
        ),
        MockLink::Hspa => (
            "gsm",
            NM_METERED_YES,
            MODEM_DEVICE,
            NM_DEVICE_TYPE_MODEM,
            MM_ACCESS_TECHNOLOGY_HSPA,
        ),
        MockLink::Wifi { metered } => (
            "802-11-wireless",
            if metered {
                NM_METERED_GUESS_YES
            } else {
                NM_METERED_GUESS_NO
            },
            WIFI_DEVICE,
            NM_DEVICE_TYPE_WIFI,
            0,
        ),
        MockLink::Ethernet => (
            "802-3-ethernet",
            NM_METERED_NO,
            ETHERNET_DEVICE,
            NM_DEVICE_TYPE_ETHERNET,
            0,
        ),
    };
    assert_eq!(u32_of(&nm, "State"), NM_STATE_CONNECTED_GLOBAL, "{link:?}");
    assert_eq!(
        u32_of(&nm, "Connectivity"),
        NM_CONNECTIVITY_FULL,
        "{link:?}"
    );
    assert_eq!(str_of(&nm, "PrimaryConnectionType"), conn_type, "{link:?}");
    assert_eq!(u32_of(&nm, "Metered"), metered, "{link:?}");
    assert!(primary.starts_with(ACTIVE_CONNECTION_PREFIX), "{primary}");
    assert_eq!(paths_of(&nm, "ActiveConnections"), [primary.as_str()]);

    let active = props(conn, NM_NAME, &primary, ACTIVE_CONNECTION_IFACE).await;
    assert_eq!(str_of(&active, "Type"), conn_type);
    assert_eq!(paths_of(&active, "Devices"), [device]);
    assert_eq!(
        u32_of(&active, "State"),
        NM_ACTIVE_CONNECTION_STATE_ACTIVATED
    );
    assert!(bool_of(&active, "Default"));

    let dev = props(conn, NM_NAME, device, DEVICE_IFACE).await;
    assert_eq!(u32_of(&dev, "DeviceType"), device_type);
    assert_eq!(path_of(&dev, "ActiveConnection"), primary);
    assert!(!str_of(&dev, "Interface").is_empty());
    let udi = str_of(&dev, "Udi");
    if conn_type == "gsm" {
        assert_eq!(udi, MODEM_PATH);
        let modem = props(conn, MM_NAME, &udi, MODEM_IFACE).await;
        assert_eq!(u32_of(&modem, "AccessTechnologies"), tech, "{link:?}");
        assert_eq!(i32_of(&modem, "State"), MM_MODEM_STATE_CONNECTED);
    }
    primary
}

async fn signals(conn: &Connection, rule: MatchRule<'static>) -> MessageStream {
    MessageStream::for_match_rule(rule, conn, Some(64))
        .await
        .expect("subscribe")
}

async fn next_signal(stream: &mut MessageStream) -> Message {
    let next = std::future::poll_fn(|cx| std::pin::Pin::new(&mut *stream).poll_next(cx));
    tokio::time::timeout(Duration::from_secs(5), next)
        .await
        .expect("a signal within 5 s")
        .expect("the stream stays open")
        .expect("a well-formed message")
}

fn path_of_message(msg: &Message) -> String {
    msg.header()
        .path()
        .expect("a signal has a path")
        .to_string()
}

fn properties_changed() -> MatchRule<'static> {
    MatchRule::builder()
        .msg_type(MessageType::Signal)
        .interface("org.freedesktop.DBus.Properties")
        .expect("valid interface")
        .member("PropertiesChanged")
        .expect("valid member")
        .build()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_link_reads_back_and_old_connections_go() {
    let mock = NetMock::start();
    let conn = connect(&mock).await;
    assert!(has_owner(&conn, NM_NAME).await && has_owner(&conn, MM_NAME).await);
    assert_shows(&conn, MockLink::Offline).await;

    let mut previous: Option<(MockLink, String)> = None;
    for link in [
        MockLink::Edge,
        MockLink::Lte,
        MockLink::Hspa,
        MockLink::Wifi { metered: true },
        MockLink::Wifi { metered: false },
        MockLink::Ethernet,
        MockLink::Offline,
        MockLink::Lte,
        MockLink::Lte,
    ] {
        mock.set_link(link);
        assert_eq!(mock.link(), link);
        let primary = assert_shows(&conn, link).await;
        if let Some((before, old)) = previous.take() {
            if connection_kind(before) == connection_kind(link) {
                assert_eq!(primary, old, "{before:?} to {link:?} keeps its connection");
            } else if old != "/" {
                assert_ne!(primary, old, "{before:?} to {link:?}");
                assert!(
                    try_props(&conn, NM_NAME, &old, ACTIVE_CONNECTION_IFACE)
                        .await
                        .is_err(),
                    "{old} should be gone after moving to {link:?}"
                );
            }
        }
        previous = Some((link, primary));
    }
}

/// Links that share a NetworkManager connection: Edge and LTE both run on the gsm one.
fn connection_kind(link: MockLink) -> u8 {
    match link {
        MockLink::Offline => 0,
        MockLink::Edge | MockLink::Lte | MockLink::Hspa => 1,
        MockLink::Wifi { .. } => 2,
        MockLink::Ethernet => 3,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_are_announced_modem_first_network_manager_last() {
    let mock = NetMock::start();
    let conn = connect(&mock).await;
    let mut stream = signals(&conn, properties_changed()).await;
    let nm_owner = zbus::fdo::DBusProxy::new(&conn)
        .await
        .expect("bus proxy")
        .get_name_owner(BusName::try_from(NM_NAME).expect("valid name"))
        .await
        .expect("NetworkManager has an owner")
        .to_string();

    mock.set_link(MockLink::Edge);
    let first = next_signal(&mut stream).await;
    assert_eq!(path_of_message(&first), MODEM_PATH);
    let mut last = first;
    while path_of_message(&last) != NM_PATH {
        last = next_signal(&mut stream).await;
    }
    let header = last.header();
    assert_eq!(
        header.sender().expect("a sender").to_string(),
        nm_owner,
        "NetworkManager's own connection sends its signals"
    );
    let (iface, changed, invalidated): (String, Props, Vec<String>) =
        last.body().deserialize().expect("a PropertiesChanged body");
    assert_eq!(iface, NM_IFACE);
    assert!(invalidated.is_empty());
    assert_eq!(u32_of(&changed, "State"), NM_STATE_CONNECTED_GLOBAL);
    assert_eq!(str_of(&changed, "PrimaryConnectionType"), "gsm");
    assert_eq!(u32_of(&changed, "Metered"), NM_METERED_YES);
    assert!(
        !changed.contains_key("Devices"),
        "only changed properties are announced: {changed:?}"
    );

    // Edge to LTE changes only the modem: its signal is the next one, so nothing of the
    // previous change came after NetworkManager's main object.
    mock.set_link(MockLink::Lte);
    let next = next_signal(&mut stream).await;
    assert_eq!(path_of_message(&next), MODEM_PATH);
    let (iface, changed, _): (String, Props, Vec<String>) =
        next.body().deserialize().expect("a PropertiesChanged body");
    assert_eq!(iface, MODEM_IFACE);
    assert_eq!(
        u32_of(&changed, "AccessTechnologies"),
        MM_ACCESS_TECHNOLOGY_LTE
    );

    // A guessed-metered Wi-Fi after LTE: NetworkManager's main object is again last.
    mock.set_link(MockLink::Wifi { metered: true });
    let mut last = next_signal(&mut stream).await;
    assert_eq!(path_of_message(&last), MODEM_PATH);
    while path_of_message(&last) != NM_PATH {
        last = next_signal(&mut stream).await;
    }
    let (_, changed, _): (String, Props, Vec<String>) =
        last.body().deserialize().expect("a PropertiesChanged body");
    assert_eq!(u32_of(&changed, "Metered"), NM_METERED_GUESS_YES);
    assert_eq!(str_of(&changed, "PrimaryConnectionType"), "802-11-wireless");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_manager_comes_and_goes_with_the_last_link() {
    let mut mock = NetMock::start_bus_only();
    let conn = connect(&mock).await;
    assert!(!has_owner(&conn, NM_NAME).await && !has_owner(&conn, MM_NAME).await);

    // Set while absent: shown as soon as it starts.
    mock.set_link(MockLink::Wifi { metered: true });
    mock.start_network_manager();
    assert!(has_owner(&conn, NM_NAME).await && has_owner(&conn, MM_NAME).await);
    assert_shows(&conn, MockLink::Wifi { metered: true }).await;

    let rule = MatchRule::builder()
        .msg_type(MessageType::Signal)
        .sender("org.freedesktop.DBus")
        .expect("valid sender")
        .member("NameOwnerChanged")
        .expect("valid member")
        .arg(0, NM_NAME)
        .expect("valid arg")
        .build();
    let mut owner_changes = signals(&conn, rule).await;
    mock.stop_network_manager();
    assert!(!mock.network_manager_running());
    assert!(!has_owner(&conn, NM_NAME).await && !has_owner(&conn, MM_NAME).await);
    let gone = next_signal(&mut owner_changes).await;
    let (name, _old, new): (String, String, String) =
        gone.body().deserialize().expect("a NameOwnerChanged body");
    assert_eq!((name.as_str(), new.as_str()), (NM_NAME, ""));

    mock.set_link(MockLink::Lte);
    mock.start_network_manager();
    let back = next_signal(&mut owner_changes).await;
    let (_, _, new): (String, String, String) =
        back.body().deserialize().expect("a NameOwnerChanged body");
    assert!(!new.is_empty(), "NetworkManager is back");
    assert_shows(&conn, MockLink::Lte).await;

    // Starting it again while it runs is a restart: a new owner, the same link.
    mock.start_network_manager();
    let _gone = next_signal(&mut owner_changes).await;
    let again = next_signal(&mut owner_changes).await;
    let (_, _, newer): (String, String, String) =
        again.body().deserialize().expect("a NameOwnerChanged body");
    assert!(!newer.is_empty() && newer != new, "a new NetworkManager");
    assert_shows(&conn, MockLink::Lte).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_bus_keeps_its_address() {
    let mut mock = NetMock::start();
    mock.set_link(MockLink::Ethernet);
    let address = mock.address();
    let old = connect(&mock).await;

    mock.restart_bus();
    assert_eq!(mock.address(), address);
    assert!(
        try_props(&old, NM_NAME, NM_PATH, NM_IFACE).await.is_err(),
        "a connection to the old bus is dead"
    );
    let conn = connect(&mock).await;
    assert_shows(&conn, MockLink::Ethernet).await;
    mock.set_link(MockLink::Edge);
    assert_shows(&conn, MockLink::Edge).await;
}
