//! A private system bus with a fake NetworkManager and a fake ModemManager, for tests of
//! the daemon's link watcher: start the daemon with `DBUS_SYSTEM_BUS_ADDRESS` set to
//! [`NetMock::address`], then move the "device" between links with
//! [`NetMock::set_link`], take NetworkManager away and bring it back, or restart the bus.
//!
//! The bus is a real `dbus-daemon` with a session-style config, listening on a socket in
//! a temporary folder (never the machine's system bus). Both services are Debian's
//! python-dbusmock, run by Debian's `/usr/bin/python3`, with the small template in
//! `tests/netmock/dbusmock_helpers.py`. They present the objects and properties a
//! watcher reads (see [`MockLink`] for the values) and announce every change with the
//! standard `org.freedesktop.DBus.Properties.PropertiesChanged`, only for properties
//! whose value changed, one signal per object and change, ModemManager first and
//! NetworkManager's main object last. The names appear on the bus only once all their
//! objects are in place.

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tempfile::TempDir;
use zbus::zvariant::{ObjectPath, OwnedValue, Value};
use zbus::Connection;

pub const NM_NAME: &str = "org.freedesktop.NetworkManager";
pub const NM_PATH: &str = "/org/freedesktop/NetworkManager";
pub const NM_IFACE: &str = "org.freedesktop.NetworkManager";
pub const ACTIVE_CONNECTION_IFACE: &str = "org.freedesktop.NetworkManager.Connection.Active";
pub const DEVICE_IFACE: &str = "org.freedesktop.NetworkManager.Device";
/// The devices NetworkManager always lists, whatever the link.
pub const ETHERNET_DEVICE: &str = "/org/freedesktop/NetworkManager/Devices/1";
pub const WIFI_DEVICE: &str = "/org/freedesktop/NetworkManager/Devices/2";
pub const MODEM_DEVICE: &str = "/org/freedesktop/NetworkManager/Devices/3";
/// Where active connections are created, numbered from 1 for the harness's lifetime.
pub const ACTIVE_CONNECTION_PREFIX: &str = "/org/freedesktop/NetworkManager/ActiveConnection/";

pub const MM_NAME: &str = "org.freedesktop.ModemManager1";
pub const MM_PATH: &str = "/org/freedesktop/ModemManager1";
/// The modem, and the `Udi` of [`MODEM_DEVICE`], as real NetworkManager names it.
pub const MODEM_PATH: &str = "/org/freedesktop/ModemManager1/Modem/0";
pub const MODEM_IFACE: &str = "org.freedesktop.ModemManager1.Modem";

// NMState, NMConnectivityState, NMMetered, NMDeviceType, NMDeviceState and
// NMActiveConnectionState from NetworkManager's D-Bus API reference.
pub const NM_STATE_DISCONNECTED: u32 = 20;
pub const NM_STATE_CONNECTED_GLOBAL: u32 = 70;
pub const NM_CONNECTIVITY_NONE: u32 = 1;
pub const NM_CONNECTIVITY_FULL: u32 = 4;
pub const NM_METERED_UNKNOWN: u32 = 0;
pub const NM_METERED_YES: u32 = 1;
pub const NM_METERED_NO: u32 = 2;
pub const NM_METERED_GUESS_YES: u32 = 3;
pub const NM_METERED_GUESS_NO: u32 = 4;
pub const NM_DEVICE_TYPE_ETHERNET: u32 = 1;
pub const NM_DEVICE_TYPE_WIFI: u32 = 2;
pub const NM_DEVICE_TYPE_MODEM: u32 = 8;
pub const NM_DEVICE_STATE_DISCONNECTED: u32 = 30;
pub const NM_DEVICE_STATE_ACTIVATED: u32 = 100;
pub const NM_ACTIVE_CONNECTION_STATE_ACTIVATED: u32 = 2;
pub const NM_ACTIVE_CONNECTION_STATE_DEACTIVATED: u32 = 4;
// MMModemState and MMModemAccessTechnology from ModemManager's API reference.
pub const MM_MODEM_STATE_ENABLED: i32 = 6;
pub const MM_MODEM_STATE_SEARCHING: i32 = 7;
pub const MM_MODEM_STATE_CONNECTED: i32 = 11;
pub const MM_ACCESS_TECHNOLOGY_UNKNOWN: u32 = 0;
pub const MM_ACCESS_TECHNOLOGY_EDGE: u32 = 1 << 4;
pub const MM_ACCESS_TECHNOLOGY_HSPA: u32 = 1 << 8;
pub const MM_ACCESS_TECHNOLOGY_LTE: u32 = 1 << 14;

const MOCK_IFACE: &str = "org.freedesktop.DBus.Mock";
const PYTHON: &str = "/usr/bin/python3";
/// How long a process may take to come up, or a mock to answer, on a loaded machine.
const DEADLINE: Duration = Duration::from_secs(20);

/// What the device is connected through, as NetworkManager and ModemManager present it.
///
/// | link | NM `State`/`Connectivity` | `PrimaryConnectionType` | `Metered` | modem `State`, `AccessTechnologies` |
/// |---|---|---|---|---|
/// | `Offline` | 20 / 1 | `""` (`PrimaryConnection` `/`) | 0 unknown | 7 searching, 0 |
/// | `Edge` | 70 / 4 | `gsm` on [`MODEM_DEVICE`] | 1 yes | 11 connected, EDGE (16) |
/// | `Lte` | 70 / 4 | `gsm` on [`MODEM_DEVICE`] | 1 yes | 11 connected, LTE (16384) |
/// | `Hspa` | 70 / 4 | `gsm` on [`MODEM_DEVICE`] | 1 yes | 11 connected, HSPA (256) |
/// | `Wifi` | 70 / 4 | `802-11-wireless` on [`WIFI_DEVICE`] | 3 guess-yes if metered, else 4 guess-no | 6 enabled, 0 |
/// | `Ethernet` | 70 / 4 | `802-3-ethernet` on [`ETHERNET_DEVICE`] | 2 no | 6 enabled, 0 |
///
/// Moving between links of the same kind (`Edge`, `Lte`, `Hspa`, or the two `Wifi`) keeps the
/// active connection, as NetworkManager does: `Edge` to `Lte` changes only the modem.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MockLink {
    Offline,
    Edge,
    Lte,
    Hspa,
    Wifi { metered: bool },
    Ethernet,
}

/// The kind of NetworkManager connection a link runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Gsm,
    Wifi,
    Ethernet,
}

impl Kind {
    fn connection_type(self) -> &'static str {
        match self {
            Kind::Gsm => "gsm",
            Kind::Wifi => "802-11-wireless",
            Kind::Ethernet => "802-3-ethernet",
        }
    }

    fn device(self) -> &'static str {
        match self {
            Kind::Gsm => MODEM_DEVICE,
            Kind::Wifi => WIFI_DEVICE,
            Kind::Ethernet => ETHERNET_DEVICE,
        }
    }
}

impl MockLink {
    fn kind(self) -> Option<Kind> {
        match self {
            MockLink::Offline => None,
            MockLink::Edge | MockLink::Lte | MockLink::Hspa => Some(Kind::Gsm),
            MockLink::Wifi { .. } => Some(Kind::Wifi),
            MockLink::Ethernet => Some(Kind::Ethernet),
        }
    }

    fn metered(self) -> u32 {
        match self {
            MockLink::Offline => NM_METERED_UNKNOWN,
            MockLink::Edge | MockLink::Lte | MockLink::Hspa => NM_METERED_YES,
            // NetworkManager's guesses (from the access point), so a watcher must treat a
            // guessed yes as yes.
            MockLink::Wifi { metered: true } => NM_METERED_GUESS_YES,
            MockLink::Wifi { metered: false } => NM_METERED_GUESS_NO,
            MockLink::Ethernet => NM_METERED_NO,
        }
    }
}

/// One of the two mocked services.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Service {
    NetworkManager,
    ModemManager,
}

impl Service {
    fn name(self) -> &'static str {
        match self {
            Service::NetworkManager => NM_NAME,
            Service::ModemManager => MM_NAME,
        }
    }

    /// The name the mock starts under, so the real one appears only when it is complete.
    fn staging_name(self) -> &'static str {
        match self {
            Service::NetworkManager => "org.fieldsync.NetMock.NetworkManager",
            Service::ModemManager => "org.fieldsync.NetMock.ModemManager",
        }
    }

    /// dbusmock's own object, which takes the control calls. Both are the services' real
    /// `ObjectManager` paths.
    fn root(self) -> &'static str {
        match self {
            Service::NetworkManager => "/org/freedesktop",
            Service::ModemManager => MM_PATH,
        }
    }

    fn root_iface(self) -> &'static str {
        match self {
            Service::NetworkManager => "org.freedesktop.DBus.ObjectManager",
            Service::ModemManager => "org.freedesktop.ModemManager1",
        }
    }

    fn file_stem(self) -> &'static str {
        match self {
            Service::NetworkManager => "networkmanager",
            Service::ModemManager => "modemmanager",
        }
    }
}

type Props = Vec<(&'static str, OwnedValue)>;

fn val<'a>(v: impl Into<Value<'a>>) -> OwnedValue {
    v.into()
        .try_to_owned()
        .expect("a plain value converts to an owned one")
}

fn path_val(path: &str) -> OwnedValue {
    val(ObjectPath::try_from(path.to_owned()).expect("a valid object path"))
}

fn paths_val(paths: &[&str]) -> OwnedValue {
    let paths: Vec<ObjectPath<'static>> = paths
        .iter()
        .map(|p| ObjectPath::try_from(p.to_string()).expect("a valid object path"))
        .collect();
    val(paths)
}

fn modem_props(link: MockLink) -> Props {
    let (state, tech, quality) = match link {
        MockLink::Offline => (MM_MODEM_STATE_SEARCHING, MM_ACCESS_TECHNOLOGY_UNKNOWN, 0u32),
        MockLink::Edge => (MM_MODEM_STATE_CONNECTED, MM_ACCESS_TECHNOLOGY_EDGE, 40),
        MockLink::Lte => (MM_MODEM_STATE_CONNECTED, MM_ACCESS_TECHNOLOGY_LTE, 70),
        MockLink::Hspa => (MM_MODEM_STATE_CONNECTED, MM_ACCESS_TECHNOLOGY_HSPA, 55),
        MockLink::Wifi { .. } | MockLink::Ethernet => {
            (MM_MODEM_STATE_ENABLED, MM_ACCESS_TECHNOLOGY_UNKNOWN, 0)
        }
    };
    vec![
        ("State", val(state)),
        ("AccessTechnologies", val(tech)),
        ("SignalQuality", val((quality, true))),
        ("Manufacturer", val("fieldsync")),
        ("Model", val("netmock")),
        ("PrimaryPort", val("cdc-wdm0")),
    ]
}

/// (path, `DeviceType`, `Udi`, `Interface`, `Driver`)
const DEVICES: [(&str, u32, &str, &str, &str); 3] = [
    (
        ETHERNET_DEVICE,
        NM_DEVICE_TYPE_ETHERNET,
        "/sys/devices/platform/netmock/net/eth0",
        "eth0",
        "netmock-eth",
    ),
    (
        WIFI_DEVICE,
        NM_DEVICE_TYPE_WIFI,
        "/sys/devices/platform/netmock/net/wlan0",
        "wlan0",
        "netmock-wifi",
    ),
    // NetworkManager names a ModemManager modem by its object path, and its Interface is
    // the control port.
    (
        MODEM_DEVICE,
        NM_DEVICE_TYPE_MODEM,
        MODEM_PATH,
        "cdc-wdm0",
        "netmock-mm",
    ),
];

fn device_props(path: &str, active: Option<(&str, Kind)>) -> Props {
    let (_, device_type, udi, interface, driver) = DEVICES
        .iter()
        .find(|d| d.0 == path)
        .expect("one of DEVICES");
    let active = active.filter(|(_, kind)| kind.device() == path);
    let ip_interface = match (path, active) {
        (MODEM_DEVICE, Some(_)) => "wwan0",
        (MODEM_DEVICE, None) => "",
        _ => interface,
    };
    vec![
        ("DeviceType", val(*device_type)),
        ("Udi", val(*udi)),
        ("Interface", val(*interface)),
        ("IpInterface", val(ip_interface)),
        ("Driver", val(*driver)),
        ("Managed", val(true)),
        (
            "State",
            val(if active.is_some() {
                NM_DEVICE_STATE_ACTIVATED
            } else {
                NM_DEVICE_STATE_DISCONNECTED
            }),
        ),
        ("ActiveConnection", path_val(active.map_or("/", |(p, _)| p))),
    ]
}

fn active_connection_props(number: u32, kind: Kind) -> Props {
    let name = match kind {
        Kind::Gsm => "netmock-gsm",
        Kind::Wifi => "netmock-wifi",
        Kind::Ethernet => "netmock-ethernet",
    };
    vec![
        ("Type", val(kind.connection_type())),
        ("Devices", paths_val(&[kind.device()])),
        ("State", val(NM_ACTIVE_CONNECTION_STATE_ACTIVATED)),
        ("StateFlags", val(0u32)),
        ("Default", val(true)),
        ("Default6", val(false)),
        ("Vpn", val(false)),
        ("Id", val(name)),
        (
            "Uuid",
            val(format!("00000000-0000-4000-8000-{number:012}").as_str()),
        ),
        ("Connection", path_val("/")),
        ("SpecificObject", path_val("/")),
    ]
}

fn nm_props(link: MockLink, active: Option<(&str, Kind)>) -> Props {
    let (state, connectivity) = if active.is_some() {
        (NM_STATE_CONNECTED_GLOBAL, NM_CONNECTIVITY_FULL)
    } else {
        (NM_STATE_DISCONNECTED, NM_CONNECTIVITY_NONE)
    };
    let active_paths: Vec<&str> = active.iter().map(|(p, _)| *p).collect();
    vec![
        ("Version", val("1.42.4")),
        ("Startup", val(false)),
        ("NetworkingEnabled", val(true)),
        ("WirelessEnabled", val(true)),
        ("WwanEnabled", val(true)),
        ("State", val(state)),
        ("Connectivity", val(connectivity)),
        (
            "PrimaryConnection",
            path_val(active.map_or("/", |(p, _)| p)),
        ),
        (
            "PrimaryConnectionType",
            val(active.map_or("", |(_, k)| k.connection_type())),
        ),
        ("ActivatingConnection", path_val("/")),
        ("Metered", val(link.metered())),
        ("ActiveConnections", paths_val(&active_paths)),
        ("Devices", paths_val(&DEVICES.map(|d| d.0))),
        ("AllDevices", paths_val(&DEVICES.map(|d| d.0))),
    ]
}

/// What the harness believes the mocks hold.
struct Model {
    link: MockLink,
    /// The active connection's path and kind while the link is up.
    active: Option<(String, Kind)>,
    /// The last number used under [`ACTIVE_CONNECTION_PREFIX`].
    last_active: u32,
    /// The properties last given to the modem, the devices and NetworkManager's main
    /// object, by path: only changes are sent, as the real services do.
    sent: HashMap<String, BTreeMap<&'static str, OwnedValue>>,
}

impl Model {
    fn new_active_path(&mut self) -> String {
        self.last_active += 1;
        format!("{ACTIVE_CONNECTION_PREFIX}{}", self.last_active)
    }
}

/// A private system bus with NetworkManager and ModemManager mocks. Everything is
/// killed on drop.
pub struct NetMock {
    pub dir: TempDir,
    socket: PathBuf,
    conf: PathBuf,
    bus: Option<Child>,
    network_manager: Option<Child>,
    modem_manager: Option<Child>,
    /// How many times the mocks were started: each start logs to files of its own, as
    /// dbusmock truncates its log file.
    starts: u32,
    /// The harness's own connection, for controlling the mocks.
    conn: Option<Connection>,
    /// zbus needs a tokio runtime; this one is the harness's own so its blocking API
    /// works from plain and async tests alike.
    rt: Option<tokio::runtime::Runtime>,
    model: Mutex<Model>,
}

impl NetMock {
    /// The bus, NetworkManager and ModemManager, with the link [`MockLink::Offline`].
    pub fn start() -> NetMock {
        let mut mock = NetMock::start_bus_only();
        mock.start_network_manager();
        mock
    }

    /// Only the bus: NetworkManager and ModemManager are absent until
    /// [`NetMock::start_network_manager`].
    pub fn start_bus_only() -> NetMock {
        let dir = tempfile::Builder::new()
            .prefix("fieldsync-netmock")
            .tempdir()
            .expect("temp dir");
        let socket = dir.path().join("bus");
        let conf = dir.path().join("bus.conf");
        std::fs::write(
            &conf,
            format!(
                r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:path={}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>
</busconfig>
"#,
                socket.display()
            ),
        )
        .expect("write bus.conf");
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("netmock")
            .enable_all()
            .build()
            .expect("tokio runtime for the netmock harness");
        let mut mock = NetMock {
            dir,
            socket,
            conf,
            bus: None,
            network_manager: None,
            modem_manager: None,
            starts: 0,
            conn: None,
            rt: Some(rt),
            model: Mutex::new(Model {
                link: MockLink::Offline,
                active: None,
                last_active: 0,
                sent: HashMap::new(),
            }),
        };
        mock.spawn_bus();
        mock
    }

    /// The bus's address, for `DBUS_SYSTEM_BUS_ADDRESS`.
    pub fn address(&self) -> String {
        format!("unix:path={}", self.socket.display())
    }

    /// The link last set (the mocks show it whenever they run).
    pub fn link(&self) -> MockLink {
        self.model().link
    }

    pub fn network_manager_running(&self) -> bool {
        self.network_manager.is_some()
    }

    /// Moves the device to `link`. Returns once both mocks hold the new values and have
    /// sent their PropertiesChanged signals: ModemManager's first, NetworkManager's main
    /// object last. Setting the link it already has sends nothing. Without the mocks
    /// running, the link is only remembered for their next start.
    pub fn set_link(&self, link: MockLink) {
        let mut model = self.model();
        if self.network_manager.is_none() {
            model.link = link;
            return;
        }
        let old = model.active.clone();
        let active = match (link.kind(), &old) {
            (None, _) => None,
            (Some(kind), Some((path, old_kind))) if *old_kind == kind => Some((path.clone(), kind)),
            (Some(kind), _) => Some((model.new_active_path(), kind)),
        };
        let replaced = old
            .clone()
            .filter(|(path, _)| Some(path) != active.as_ref().map(|(p, _)| p));

        self.update(
            &mut model,
            Service::ModemManager,
            MODEM_PATH,
            MODEM_IFACE,
            modem_props(link),
        );
        if let Some((path, kind)) = &active {
            if old.as_ref().map(|(p, _)| p) != Some(path) {
                let number = model.last_active;
                self.add_object(
                    Service::NetworkManager,
                    path,
                    ACTIVE_CONNECTION_IFACE,
                    active_connection_props(number, *kind),
                );
            }
        }
        if let Some((path, _)) = &replaced {
            self.set_properties(
                Service::NetworkManager,
                path,
                ACTIVE_CONNECTION_IFACE,
                vec![("State", val(NM_ACTIVE_CONNECTION_STATE_DEACTIVATED))],
            );
        }
        let active_ref = active.as_ref().map(|(p, k)| (p.as_str(), *k));
        for (device, ..) in DEVICES {
            self.update(
                &mut model,
                Service::NetworkManager,
                device,
                DEVICE_IFACE,
                device_props(device, active_ref),
            );
        }
        self.update(
            &mut model,
            Service::NetworkManager,
            NM_PATH,
            NM_IFACE,
            nm_props(link, active_ref),
        );
        // Gone only after nothing points at it any more; real NetworkManager keeps a
        // deactivated connection around briefly too.
        if let Some((path, _)) = &replaced {
            self.mock_call(
                Service::NetworkManager,
                Service::NetworkManager.root(),
                "RemoveObject",
                &(path.as_str(),),
            );
        }
        model.link = link;
        model.active = active;
    }

    /// Starts both mocks (killing them first if they run) with the last link set.
    /// Returns when both names are on the bus, each with all its objects.
    pub fn start_network_manager(&mut self) {
        self.stop_network_manager();
        self.starts += 1;
        // Both Pythons start at once: their start-up is most of the time this takes.
        self.modem_manager = Some(self.spawn_mock(Service::ModemManager));
        self.network_manager = Some(self.spawn_mock(Service::NetworkManager));
        for service in [Service::ModemManager, Service::NetworkManager] {
            self.wait_for_name(service.staging_name(), Some(service), true);
            self.mock_call(
                service,
                service.root(),
                "AddTemplate",
                &(helpers_template(), HashMap::<&str, Value>::new()),
            );
        }

        let mut model = self.model();
        model.sent.clear();
        let link = model.link;
        // A restarted NetworkManager makes new active connections.
        let active = link.kind().map(|kind| (model.new_active_path(), kind));
        let active_ref = active.as_ref().map(|(p, k)| (p.as_str(), *k));

        let modem = modem_props(link);
        self.add_object(
            Service::ModemManager,
            MODEM_PATH,
            MODEM_IFACE,
            modem.clone(),
        );
        model
            .sent
            .insert(MODEM_PATH.into(), modem.into_iter().collect());
        self.claim_name(Service::ModemManager);

        if let Some((path, kind)) = active_ref {
            let number = model.last_active;
            self.add_object(
                Service::NetworkManager,
                path,
                ACTIVE_CONNECTION_IFACE,
                active_connection_props(number, kind),
            );
        }
        for (device, ..) in DEVICES {
            let props = device_props(device, active_ref);
            self.add_object(Service::NetworkManager, device, DEVICE_IFACE, props.clone());
            model
                .sent
                .insert(device.into(), props.into_iter().collect());
        }
        let props = nm_props(link, active_ref);
        self.add_object(Service::NetworkManager, NM_PATH, NM_IFACE, props.clone());
        model
            .sent
            .insert(NM_PATH.into(), props.into_iter().collect());
        self.claim_name(Service::NetworkManager);
        model.active = active;
    }

    /// Sends, `rounds` times, signals of the kind the real services send all day while
    /// the link stays as it is: ModemManager's signal quality (polled every 30 s), a
    /// device object's properties, and NetworkManager's main object announcing a
    /// property no link depends on. Returns once all were sent.
    pub fn chatter(&self, rounds: u32) {
        let devices = || paths_val(&DEVICES.map(|d| d.0));
        for round in 0..rounds {
            self.set_properties(
                Service::ModemManager,
                MODEM_PATH,
                MODEM_IFACE,
                vec![("SignalQuality", val((round % 100, true)))],
            );
            self.set_properties(
                Service::NetworkManager,
                WIFI_DEVICE,
                DEVICE_IFACE,
                vec![("Driver", val("netmock-wifi"))],
            );
            self.set_properties(
                Service::NetworkManager,
                NM_PATH,
                NM_IFACE,
                vec![("Devices", devices())],
            );
        }
    }

    /// Kills both mocks (no goodbye, as in a crash) and returns once their names have
    /// left the bus.
    pub fn stop_network_manager(&mut self) {
        for service in [Service::NetworkManager, Service::ModemManager] {
            if let Some(child) = self.mock_child(service).take() {
                kill(child);
                if self.bus.is_some() {
                    self.wait_for_name(service.name(), None, false);
                }
            }
        }
        self.model().active = None;
    }

    /// Kills the bus and the mocks, starts a new bus on the same socket path, and the
    /// mocks again (if they were running) with the last link.
    pub fn restart_bus(&mut self) {
        let mocks_were_running = self.network_manager.is_some();
        self.kill_all();
        self.spawn_bus();
        if mocks_were_running {
            self.start_network_manager();
        }
    }

    /// The bus's and the mocks' logs (dbusmock logs every call it answers, the watcher's
    /// property reads included), for assertion messages.
    pub fn log(&self) -> String {
        let mut names: Vec<String> = std::fs::read_dir(self.dir.path())
            .map(|dir| {
                dir.filter_map(Result::ok)
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.ends_with(".log") || n.ends_with(".stderr"))
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        let mut out = String::new();
        for name in names {
            let text = std::fs::read_to_string(self.dir.path().join(&name)).unwrap_or_default();
            out.push_str(&format!("--- {name}\n{text}"));
        }
        out
    }

    fn model(&self) -> std::sync::MutexGuard<'_, Model> {
        // A test that panicked mid-change leaves a model no worse than the mocks'.
        self.model.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn mock_child(&mut self, service: Service) -> &mut Option<Child> {
        match service {
            Service::NetworkManager => &mut self.network_manager,
            Service::ModemManager => &mut self.modem_manager,
        }
    }

    fn spawn_bus(&mut self) {
        assert!(self.bus.is_none(), "dbus-daemon already running");
        // A killed bus leaves its socket file behind.
        let _ = std::fs::remove_file(&self.socket);
        let log = append(&self.dir.path().join("bus.log"));
        let child = Command::new("dbus-daemon")
            .arg("--nofork")
            .arg("--nopidfile")
            .arg(format!("--config-file={}", self.conf.display()))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log)
            .spawn()
            .expect("dbus-daemon starts (scripts/install-deps.sh installs it)");
        self.bus = Some(child);
        let deadline = Instant::now() + DEADLINE;
        while std::os::unix::net::UnixStream::connect(&self.socket).is_err() {
            if let Some(Ok(Some(status))) = self.bus.as_mut().map(|c| c.try_wait()) {
                panic!("dbus-daemon exited with {status}:\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "dbus-daemon did not listen on {} in {DEADLINE:?}:\n{}",
                self.socket.display(),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        let address = self.address();
        let conn = self.block_on(async move {
            zbus::connection::Builder::address(address.as_str())?
                .build()
                .await
        });
        self.conn = Some(conn.unwrap_or_else(|e| {
            panic!(
                "cannot connect to the test bus {}: {e}\n{}",
                self.address(),
                self.log()
            )
        }));
    }

    fn spawn_mock(&self, service: Service) -> Child {
        let stem = service.file_stem();
        let stderr = append(&self.dir.path().join(format!("{stem}.stderr")));
        Command::new(PYTHON)
            .args([
                "-m",
                "dbusmock",
                "--system",
                "--is-object-manager",
                "--logfile",
            ])
            .arg(self.dir.path().join(format!("{stem}.log")))
            .args([service.staging_name(), service.root(), service.root_iface()])
            // dbusmock falls back to the machine's system bus when this is empty.
            .env("DBUS_SYSTEM_BUS_ADDRESS", self.address())
            .env_remove("DBUS_SESSION_BUS_ADDRESS")
            // Debian's Python must not pick up another Python's modules.
            .env_remove("PYTHONPATH")
            .env_remove("PYTHONHOME")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("/usr/bin/python3 starts (scripts/install-deps.sh installs python3-dbusmock)")
    }

    /// Polls the bus until `name` has (or has no longer) an owner. When `service`'s
    /// process exits first, panics with its log.
    fn wait_for_name(&mut self, name: &'static str, service: Option<Service>, owned: bool) {
        let bus_name = zbus::names::BusName::try_from(name).expect("a valid bus name");
        let deadline = Instant::now() + DEADLINE;
        loop {
            let conn = self.conn().clone();
            let bus_name = bus_name.clone();
            let has_owner = self.block_on(async move {
                let dbus = zbus::fdo::DBusProxy::new(&conn).await?;
                dbus.name_has_owner(bus_name).await
            });
            match has_owner {
                Ok(has) if has == owned => return,
                Ok(_) => {}
                Err(e) => panic!("NameHasOwner({name}) failed: {e}\n{}", self.log()),
            }
            if let Some(service) = service {
                if let Some(Ok(Some(status))) =
                    self.mock_child(service).as_mut().map(|c| c.try_wait())
                {
                    panic!("the {service:?} mock exited with {status}:\n{}", self.log());
                }
            }
            assert!(
                Instant::now() < deadline,
                "{name} {} the bus in {DEADLINE:?}:\n{}",
                if owned {
                    "did not appear on"
                } else {
                    "did not leave"
                },
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn claim_name(&self, service: Service) {
        self.mock_call(
            service,
            service.root(),
            "RequestBusName",
            &(service.name(),),
        );
    }

    fn add_object(&self, service: Service, path: &str, iface: &str, props: Props) {
        let props: HashMap<&str, OwnedValue> = props.into_iter().collect();
        let no_methods: Vec<(&str, &str, &str, &str)> = Vec::new();
        self.mock_call(
            service,
            service.root(),
            "AddObject",
            &(path, iface, props, no_methods),
        );
    }

    fn set_properties(&self, service: Service, path: &str, iface: &str, props: Props) {
        let props: HashMap<&str, OwnedValue> = props.into_iter().collect();
        self.mock_call(
            service,
            service.root(),
            "SetProperties",
            &(path, iface, props),
        );
    }

    /// Sends the properties of `path` that differ from what was last sent, in one
    /// PropertiesChanged; nothing when none changed.
    fn update(&self, model: &mut Model, service: Service, path: &str, iface: &str, props: Props) {
        let sent = model.sent.entry(path.to_owned()).or_default();
        let changed: Props = props
            .into_iter()
            .filter(|(name, value)| sent.get(name) != Some(value))
            .collect();
        if changed.is_empty() {
            return;
        }
        sent.extend(changed.iter().cloned());
        self.set_properties(service, path, iface, changed);
    }

    /// Calls one of dbusmock's control methods (org.freedesktop.DBus.Mock) and waits for
    /// its reply. Control calls go to the staging name, which the mock always has.
    fn mock_call<B>(&self, service: Service, path: &str, method: &'static str, body: &B)
    where
        B: zbus::export::serde::Serialize + zbus::zvariant::DynamicType + Sync,
    {
        let conn = self.conn().clone();
        let dest = service.staging_name();
        let result = self.block_on(async {
            tokio::time::timeout(
                DEADLINE,
                conn.call_method(Some(dest), path, Some(MOCK_IFACE), method, body),
            )
            .await
        });
        match result {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!(
                "{service:?} mock: {method} on {path} failed: {e}\n{}",
                self.log()
            ),
            Err(_) => panic!(
                "{service:?} mock: {method} on {path} got no reply in {DEADLINE:?}\n{}",
                self.log()
            ),
        }
    }

    fn conn(&self) -> &Connection {
        self.conn
            .as_ref()
            .expect("the harness is connected to its bus")
    }

    /// Runs `fut` on the harness's runtime from a thread of its own: tokio refuses to
    /// block inside a runtime, and the tests calling this run in one.
    fn block_on<F>(&self, fut: F) -> F::Output
    where
        F: Future + Send,
        F::Output: Send,
    {
        let rt = self.rt.as_ref().expect("the harness's runtime");
        std::thread::scope(|s| {
            s.spawn(|| rt.block_on(fut))
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    fn kill_all(&mut self) {
        for child in [
            self.network_manager.take(),
            self.modem_manager.take(),
            self.bus.take(),
        ]
        .into_iter()
        .flatten()
        {
            kill(child);
        }
        self.model().active = None;
        if let (Some(conn), Some(rt)) = (self.conn.take(), self.rt.as_ref()) {
            // zbus may need its runtime to tear the connection down.
            let _guard = rt.enter();
            drop(conn);
        }
    }
}

impl Drop for NetMock {
    fn drop(&mut self) {
        self.kill_all();
        if let Some(rt) = self.rt.take() {
            // A plain drop would panic inside an async test.
            rt.shutdown_background();
        }
    }
}

fn kill(mut child: Child) {
    let _ = child.kill();
    let _ = child.wait();
}

fn append(path: &Path) -> File {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
}

fn helpers_template() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("netmock/dbusmock_helpers.py");
    assert!(path.is_file(), "{} is missing", path.display());
    path.display().to_string()
}
