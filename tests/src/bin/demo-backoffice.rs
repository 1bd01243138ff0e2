//! The demo's back office: the test back office (`fieldsync_tests::backoffice`) on a
//! broker given on the command line. It acknowledges every operation, verifies and
//! acknowledges photos, answers a device's resync with the demo's work orders, and prints
//! one line for each thing that arrives. `scripts/demo.sh` starts it; Ctrl-C ends it.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use fieldsync_tests::backoffice::{BackOffice, Happened, Options, PREFIX};

/// Set while the broker connection is lost.
static LOST: AtomicBool = AtomicBool::new(false);

const USAGE: &str = "\
usage: demo-backoffice --broker mqtt://HOST:PORT [--topic-prefix PREFIX] [--device-id ID]
                       [--work-orders FILE] [--attachments DIR] [--ready-file FILE]
                       [--username NAME --password-file FILE]

  --broker        the broker the devices use (their uplink.broker); mqtt:// only
  --topic-prefix  the devices' uplink.topic_prefix [default: fieldsync/v1]
  --device-id     serve this device only (its uplink.device_id) [default: every device]
  --work-orders   a JSON list of work orders, sent to a device that asks for its full state
  --attachments   serve every file in DIR as an attachment, under its SHA-256
  --ready-file    created once the back office is connected and subscribed
  --username      log in to the broker as NAME, with the password in FILE (its first
  --password-file line), for brokers that require a login";

struct Args {
    host: String,
    port: u16,
    prefix: String,
    device: Option<String>,
    work_orders: Option<PathBuf>,
    attachments: Option<PathBuf>,
    ready_file: Option<PathBuf>,
    login: Option<(String, String)>,
}

fn parse_args() -> Result<Args, String> {
    let mut broker = None;
    let mut prefix = PREFIX.to_owned();
    let mut device = None;
    let mut work_orders = None;
    let mut ready_file = None;
    let mut attachments = None;
    let mut username = None;
    let mut password_file = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().ok_or(format!("{name} needs a value"));
        match arg.as_str() {
            "--broker" => broker = Some(value("--broker")?),
            "--topic-prefix" => prefix = value("--topic-prefix")?,
            "--device-id" => device = Some(value("--device-id")?),
            "--work-orders" => work_orders = Some(PathBuf::from(value("--work-orders")?)),
            "--ready-file" => ready_file = Some(PathBuf::from(value("--ready-file")?)),
            "--attachments" => attachments = Some(PathBuf::from(value("--attachments")?)),
            "--username" => username = Some(value("--username")?),
            "--password-file" => password_file = Some(PathBuf::from(value("--password-file")?)),
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    let broker = broker.ok_or("--broker is required")?;
    if work_orders.is_some() && device.is_none() {
        return Err("--work-orders needs --device-id".into());
    }
    let rest = broker
        .strip_prefix("mqtt://")
        .ok_or(format!(
            "{broker:?}: only mqtt://HOST:PORT brokers are supported"
        ))?
        .trim_end_matches('/');
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, p)) => (
            h.trim_start_matches('[').trim_end_matches(']'),
            p.parse::<u16>()
                .map_err(|_| format!("{broker:?}: bad port {p:?}"))?,
        ),
        None => (rest, 1883),
    };
    if host.is_empty() {
        return Err(format!("{broker:?} names no host"));
    }
    let login = match (username, password_file) {
        (None, None) => None,
        (Some(user), Some(file)) => {
            let text = std::fs::read_to_string(&file)
                .map_err(|e| format!("cannot read the password file {}: {e}", file.display()))?;
            let password = text.lines().next().unwrap_or_default().to_owned();
            Some((user, password))
        }
        _ => return Err("--username and --password-file go together".into()),
    };
    Ok(Args {
        host: host.to_owned(),
        port,
        prefix: prefix.trim_end_matches('/').to_owned(),
        device,
        work_orders,
        attachments,
        ready_file,
        login,
    })
}

/// A long id shortened for the eye: the first 8 and last 4 characters.
fn short(id: &str) -> String {
    if id.len() > 16 && id.is_ascii() {
        format!("{}…{}", &id[..8], &id[id.len() - 4..])
    } else {
        id.to_owned()
    }
}

/// One line per event, for a person watching.
fn print(what: &Happened<'_>) {
    match what {
        // The first connection is announced by `main`.
        Happened::Connected => {
            if LOST.swap(false, Ordering::Relaxed) {
                println!("back office: connected again");
            }
        }
        Happened::Lost { error } => {
            LOST.store(true, Ordering::Relaxed);
            println!("back office: broker connection lost ({error}); retrying")
        }
        Happened::Status { device, state } => println!("device {device} is {state}"),
        Happened::Applied(op) => println!(
            "applied   {:<10} {:<15} {:<6} op {} (item {})",
            op.wo,
            op.kind,
            op.act,
            op.id,
            short(&op.item)
        ),
        Happened::Repeat(op) => println!(
            "repeat    {:<10} {:<15} {:<6} op {} (already applied: acknowledged again)",
            op.wo, op.kind, op.act, op.id
        ),
        Happened::Refused { op, code, reason } => println!(
            "{:<9} {:<10} {:<15} {:<6} op {} (refused: {reason})",
            code, op.wo, op.kind, op.act, op.id
        ),
        Happened::PhotoComplete {
            device,
            sha256,
            size,
        } => println!(
            "photo     {} from {device}: {size} bytes, SHA-256 verified",
            short(sha256)
        ),
        Happened::PhotoMismatch { device, sha256 } => println!(
            "photo     {} from {device}: SHA-256 mismatch, discarded; the device sends it again",
            short(sha256)
        ),
        Happened::Resync {
            device,
            work_orders,
        } => {
            println!("resync    {device} asked for its full state: sent {work_orders} work orders")
        }
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) if e.is_empty() => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("demo-backoffice: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let work_orders: Vec<serde_json::Value> = match &args.work_orders {
        None => Vec::new(),
        Some(path) => match std::fs::read(path)
            .map_err(|e| e.to_string())
            .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
        {
            Ok(list) => list,
            Err(e) => {
                eprintln!("demo-backoffice: cannot read {}: {e}", path.display());
                return ExitCode::from(2);
            }
        },
    };
    let options = Options {
        host: args.host.clone(),
        port: args.port,
        prefix: args.prefix.clone(),
        device: args.device.clone(),
        client_id: format!("fieldsync-demo-backoffice-{}", std::process::id()),
        connect_timeout: Duration::from_secs(5),
        login: args.login.clone(),
    };
    let bo = match BackOffice::connect(options, Some(Box::new(print))).await {
        Ok(bo) => bo,
        Err(e) => {
            eprintln!("demo-backoffice: {e}\n(is the broker running? scripts/demo.sh starts one)");
            return ExitCode::FAILURE;
        }
    };
    if let Some(dir) = &args.attachments {
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) => {
                eprintln!("demo-backoffice: cannot read {}: {e}", dir.display());
                return ExitCode::FAILURE;
            }
        };
        let mut st = bo.state.lock().unwrap();
        for path in entries.flatten().map(|e| e.path()).filter(|p| p.is_file()) {
            match std::fs::read(&path) {
                Ok(bytes) => {
                    use sha2::Digest;
                    let sha = hex::encode(sha2::Sha256::digest(&bytes));
                    println!("attachment {} served as {}", path.display(), short(&sha));
                    st.attachment_files.insert(sha, bytes);
                }
                Err(e) => eprintln!("demo-backoffice: skipping {}: {e}", path.display()),
            }
        }
    }
    if let Some(device) = &args.device {
        bo.state
            .lock()
            .unwrap()
            .work_orders
            .insert(device.clone(), work_orders);
    }
    println!(
        "back office: serving {}/{}/ on mqtt://{}:{}; every operation is acknowledged",
        args.prefix,
        args.device.as_deref().unwrap_or("+"),
        args.host,
        args.port
    );
    if let Some(path) = &args.ready_file {
        if let Err(e) = std::fs::write(path, b"") {
            eprintln!("demo-backoffice: cannot create {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
    }

    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("demo-backoffice: cannot watch for SIGTERM: {e}");
            return ExitCode::FAILURE;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    let st = bo.state.lock().unwrap();
    let photos = st.photos.values().filter(|p| p.complete).count();
    println!(
        "back office: stopped; {} operations applied, {photos} photos received",
        st.applied.len()
    );
    ExitCode::SUCCESS
}
