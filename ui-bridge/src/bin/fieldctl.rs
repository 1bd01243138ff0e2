//! `fieldctl`: every ui-bridge request from the command line, for field support, scripts
//! and tests. Readable output by default, `--json` for machines.

use std::fs::File;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use ui_bridge::{
    ChecklistAnswer, Client, ClientError, Event, Item, ItemKind, Material, Operation, RecordBody,
    Severity, Status, SyncState, WorkOrderDetail, WorkOrderSummary,
};

/// Talk to the fieldsync daemon over its UI socket.
#[derive(Parser)]
#[command(version)]
struct Cli {
    /// The daemon's socket [default: $FIELDSYNC_SOCKET, else /run/fieldsync/ui.sock, else
    /// ./fieldsync-state/ui.sock]
    #[arg(long, global = true)]
    socket: Option<PathBuf>,
    /// Print the daemon's answers as JSON, one object per line.
    #[arg(long, global = true)]
    json: bool,
    /// Give up when the daemon has not answered within this many seconds (not for
    /// `watch`); a socket systemd holds accepts a connection even while the daemon
    /// cannot start.
    #[arg(long, global = true, default_value_t = 60, value_name = "SECS",
          value_parser = clap::value_parser!(u64).range(1..))]
    timeout: u64,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Unsent changes, link, last upload and download, storage.
    Status,
    /// The cached work orders.
    WorkOrders,
    /// One work order with everything captured for it.
    WorkOrder { id: String },
    /// Capture a record on a work order.
    Add {
        work_order: String,
        #[command(subcommand)]
        record: RecordArgs,
    },
    /// Replace an undelivered record's content.
    Edit {
        item: String,
        #[command(subcommand)]
        record: RecordArgs,
    },
    /// Delete an undelivered record or photo.
    Delete { item: String },
    /// Attach a photo file to a record (the file is passed to the daemon as an open
    /// descriptor, never as a path).
    AttachPhoto {
        record: String,
        file: PathBuf,
        #[arg(long)]
        mime: Option<String>,
        #[arg(long)]
        caption: Option<String>,
    },
    /// Move a work order one stage forward.
    Advance { work_order: String, stage: String },
    /// Operations waiting for delivery, oldest first.
    Outbox {
        #[arg(long)]
        limit: Option<u32>,
    },
    /// Print events as they happen until interrupted.
    Watch,
    /// Send a change the back office refused again, as it is.
    Retry { item: String },
    /// Drop a change the back office refused.
    Discard { item: String },
    /// Sync now.
    Sync,
    /// Save a diagnostics bundle for support to a new file (JSON): the daemon's status,
    /// its store's figures, refused changes with their reason codes, its latest warnings
    /// and errors, and the last lines of its journal where this user may read them.
    Diagnostics {
        /// The file to write; it must not exist yet.
        file: PathBuf,
        /// Journal lines to include.
        #[arg(long, default_value_t = 2000)]
        journal_lines: u32,
    },
    /// Full resync: check the downloaded attachments, send what waits, and replace the
    /// work-order cache with the back office's full state when it comes. Unsent work
    /// is kept.
    Resync,
    /// Save a downloaded attachment of a work order to a file.
    Attachment {
        work_order: String,
        attachment: String,
        /// Where to write it; default: its name, in the current folder.
        #[arg(long, short)]
        output: Option<PathBuf>,
    },
    /// Save what was captured in a time range to a file, one JSON object per line (the
    /// items as `work-order` shows them; photos by SHA-256, without their bytes).
    Export {
        /// The file to write; it must not exist yet.
        file: PathBuf,
        /// The first day (YYYY-MM-DD, local time) or an instant (RFC 3339, e.g.
        /// 2026-11-02T08:00:00Z).
        #[arg(long, required_unless_present = "all")]
        from: Option<String>,
        /// The last day, included (YYYY-MM-DD, local time), or an instant, excluded (RFC
        /// 3339) [default: no end].
        #[arg(long, conflicts_with = "all")]
        to: Option<String>,
        /// Everything on the device, whenever captured.
        #[arg(long, conflicts_with = "from")]
        all: bool,
    },
    /// Show or set the sync switches (kept across restarts).
    Switches {
        /// Sync by itself: on a link, after changes, on pushes and on the timer.
        #[arg(long, value_name = "on|off")]
        auto_sync: Option<OnOff>,
        /// Sync when a work order reaches its last stage, even with auto-sync off.
        #[arg(long, value_name = "on|off")]
        on_visit_completed: Option<OnOff>,
        /// Keep photos off cellular and metered links.
        #[arg(long, value_name = "on|off")]
        files_on_wifi_only: Option<OnOff>,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum OnOff {
    On,
    Off,
}

impl OnOff {
    fn on(self) -> bool {
        matches!(self, OnOff::On)
    }
}

#[derive(Subcommand)]
enum RecordArgs {
    /// A free-text note.
    Note { text: String },
    /// A defect found on site.
    Defect {
        #[arg(long)]
        title: String,
        /// low, medium, high or critical
        #[arg(long, value_parser = parse_severity)]
        severity: Severity,
        #[arg(long, default_value = "")]
        description: String,
        #[arg(long)]
        location: Option<String>,
    },
    /// Completed work with the materials used.
    Work {
        #[arg(long)]
        description: String,
        #[arg(long)]
        minutes: Option<u32>,
        /// NAME=QUANTITY UNIT, e.g. "gasket=2 pcs"; repeat for more
        #[arg(long = "material", value_parser = parse_material)]
        materials: Vec<Material>,
    },
    /// Checklist answers: ITEM=VALUE, where VALUE is true/false, a number, or text.
    Checklist {
        #[arg(required = true, value_parser = parse_answer)]
        answers: Vec<ChecklistAnswer>,
    },
    /// A record given as the protocol's JSON, e.g. '{"kind":"note","text":"..."}'.
    Json { record: String },
}

fn parse_severity(s: &str) -> Result<Severity, String> {
    serde_json::from_value(serde_json::Value::String(s.to_owned()))
        .map_err(|_| "expected low, medium, high or critical".to_owned())
}

fn parse_material(s: &str) -> Result<Material, String> {
    let (name, rest) = s.split_once('=').ok_or("expected NAME=QUANTITY UNIT")?;
    let mut parts = rest.split_whitespace();
    let quantity = parts
        .next()
        .and_then(|q| q.parse::<f64>().ok())
        .ok_or("the quantity must be a number")?;
    let unit = parts.collect::<Vec<_>>().join(" ");
    Ok(Material {
        code: None,
        name: name.trim().to_owned(),
        quantity,
        unit: if unit.is_empty() { "pcs".into() } else { unit },
    })
}

fn parse_answer(s: &str) -> Result<ChecklistAnswer, String> {
    let (item, value) = s.split_once('=').ok_or("expected ITEM=VALUE")?;
    // true/false and numbers are JSON; anything else is text.
    let value = serde_json::from_str::<serde_json::Value>(value)
        .ok()
        .filter(|v| v.is_boolean() || v.is_number())
        .unwrap_or_else(|| serde_json::Value::String(value.to_owned()));
    Ok(ChecklistAnswer {
        item_id: item.to_owned(),
        value,
        comment: None,
    })
}

impl RecordArgs {
    fn into_body(self) -> Result<RecordBody, String> {
        Ok(match self {
            RecordArgs::Note { text } => RecordBody::Note { text },
            RecordArgs::Defect {
                title,
                severity,
                description,
                location,
            } => RecordBody::Defect {
                title,
                description,
                severity,
                location,
            },
            RecordArgs::Work {
                description,
                minutes,
                materials,
            } => RecordBody::CompletedWork {
                description,
                duration_minutes: minutes,
                materials,
            },
            RecordArgs::Checklist { answers } => RecordBody::Checklist { answers },
            RecordArgs::Json { record } => {
                serde_json::from_str(&record).map_err(|e| format!("record JSON: {e}"))?
            }
        })
    }
}

fn default_socket() -> PathBuf {
    if let Some(p) = std::env::var_os("FIELDSYNC_SOCKET") {
        return p.into();
    }
    let system = PathBuf::from("/run/fieldsync/ui.sock");
    if system.exists() {
        return system;
    }
    PathBuf::from("fieldsync-state/ui.sock")
}

/// Exit codes: 0 done; 1 the daemon refused the request (what it asked is wrong or not
/// allowed); 2 a usage error; 3 no daemon on the socket; 4 the daemon could not do it
/// now (busy, storage low or failing): the same request may work later; 5 no answer in
/// time: the request may or may not have been carried out.
#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    // `fieldctl outbox | head` ends quietly, as other command-line tools do, instead of
    // failing on the closed pipe.
    // SAFETY: called before any other thread exists; it only resets a signal's handler.
    unsafe {
        let _ = nix::sys::signal::signal(
            nix::sys::signal::Signal::SIGPIPE,
            nix::sys::signal::SigHandler::SigDfl,
        );
    }
    let cli = Cli::parse();
    let json = cli.json;
    let socket = cli.socket.clone().unwrap_or_else(default_socket);
    let limit = (!matches!(cli.command, Command::Watch)).then(|| Duration::from_secs(cli.timeout));
    let outcome = match limit {
        Some(limit) => match tokio::time::timeout(limit, run(cli, socket.clone())).await {
            Ok(outcome) => outcome,
            Err(_) => {
                // Not 3: the request may have reached the daemon and been carried out,
                // so a script must look before it sends a change again.
                eprintln!(
                    "fieldctl: no answer from fieldsyncd on {} within {} s; the request may or may not have been carried out\n(is it starting, stuck, or failing to start? see `journalctl -u fieldsyncd`)",
                    socket.display(),
                    limit.as_secs()
                );
                return ExitCode::from(5);
            }
        },
        None => run(cli, socket).await,
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Usage(msg)) => {
            eprintln!("fieldctl: {msg}");
            ExitCode::from(2)
        }
        Err(Failure::Client(e @ ClientError::Connect { .. })) => {
            eprintln!("fieldctl: {e}\n(is fieldsyncd running? --socket or FIELDSYNC_SOCKET choose another socket)");
            ExitCode::from(3)
        }
        Err(Failure::Client(e)) => {
            let Some(code) = e.code() else {
                eprintln!("fieldctl: {e}");
                return ExitCode::from(1);
            };
            match (&e, json) {
                (ClientError::Daemon(body), true) => {
                    println!("{}", serde_json::json!({ "error": body }))
                }
                _ => eprintln!("fieldctl: {e}"),
            }
            use ui_bridge::ErrorCode as C;
            match code {
                C::Busy | C::StorageLow | C::StorageUnavailable | C::Internal => ExitCode::from(4),
                _ => ExitCode::from(1),
            }
        }
        Err(Failure::Local(msg)) => {
            eprintln!("fieldctl: {msg}");
            ExitCode::from(1)
        }
    }
}

enum Failure {
    Usage(String),
    Client(ClientError),
    /// A local file could not be written.
    Local(String),
}

impl From<ClientError> for Failure {
    fn from(e: ClientError) -> Self {
        Failure::Client(e)
    }
}

async fn run(cli: Cli, socket: PathBuf) -> Result<(), Failure> {
    let json = cli.json;
    let mut client = Client::connect(&socket).await?;
    match cli.command {
        Command::Status => {
            let s = client.status().await?;
            print(json, &s, print_status);
        }
        Command::WorkOrders => {
            let list = client.work_orders().await?;
            print(json, &list, |l| l.iter().for_each(print_summary));
        }
        Command::WorkOrder { id } => {
            let wo = client.work_order(&id).await?;
            print(json, &wo, print_detail);
        }
        Command::Add { work_order, record } => {
            let body = record.into_body().map_err(Failure::Usage)?;
            let item = client.add_record(&work_order, body).await?;
            print(json, &item, print_item);
        }
        Command::Edit { item, record } => {
            let body = record.into_body().map_err(Failure::Usage)?;
            let item = client.edit_record(&item, body).await?;
            print(json, &item, print_item);
        }
        Command::Delete { item } => {
            let sent_nothing = client.delete_item(&item).await?;
            let out = serde_json::json!({ "item_id": item, "sent_nothing": sent_nothing });
            print(json, &out, |_| {
                if sent_nothing {
                    println!("deleted {item}; nothing about it had been sent");
                } else {
                    println!("deleted {item}; the deletion will be sent to the back office");
                }
            });
        }
        Command::AttachPhoto {
            record,
            file,
            mime,
            caption,
        } => {
            let f = File::open(&file)
                .map_err(|e| Failure::Usage(format!("cannot open {}: {e}", file.display())))?;
            let mime = mime.or_else(|| guess_mime(&file).map(String::from));
            let item = client
                .attach_photo(&record, &f, mime.as_deref(), caption.as_deref())
                .await?;
            print(json, &item, print_item);
        }
        Command::Advance { work_order, stage } => {
            let item = client.advance_stage(&work_order, &stage).await?;
            print(json, &item, print_item);
        }
        Command::Outbox { limit } => {
            let ops = client.outbox(limit).await?;
            print(json, &ops, |ops| {
                if ops.is_empty() {
                    println!("nothing waits for delivery");
                }
                ops.iter().for_each(print_op)
            });
        }
        Command::Retry { item } => {
            let item = client.retry(&item).await?;
            print(json, &item, print_item);
        }
        Command::Discard { item } => {
            let after = client.discard(&item).await?;
            print(json, &after, |after| match after {
                Some(i) => print_item(i),
                None => println!("discarded; item {item} is gone"),
            });
        }
        Command::Sync => {
            client.sync_now().await?;
            print(json, &serde_json::json!({"sync": "started"}), |_| {
                println!("sync started")
            });
        }
        Command::Attachment {
            work_order,
            attachment,
            output,
        } => {
            let (a, fd) = client.open_attachment(&work_order, &attachment).await?;
            // Only the last part of the back office's name: never a path it chose.
            let fallback = std::path::Path::new(&a.name)
                .file_name()
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(&a.sha256));
            let out = output.unwrap_or(fallback);
            let mut src = std::fs::File::from(fd);
            let mut dst = std::fs::File::create(&out)
                .map_err(|e| Failure::Local(format!("cannot create {}: {e}", out.display())))?;
            let n = std::io::copy(&mut src, &mut dst)
                .map_err(|e| Failure::Local(format!("cannot write {}: {e}", out.display())))?;
            print(
                json,
                &serde_json::json!({"path": out, "bytes": n, "sha256": a.sha256}),
                |_| {
                    println!(
                        "saved {} ({n} bytes, SHA-256 verified on download)",
                        out.display()
                    )
                },
            );
        }
        Command::Diagnostics {
            file,
            journal_lines,
        } => {
            let report = client.diagnostics().await?;
            let problems = report.recent_problems.len();
            let (journal, journal_words) = journal_of_daemon(journal_lines);
            let bundle = serde_json::json!({
                "fieldctl_version": env!("CARGO_PKG_VERSION"),
                "generated_ms": std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as u64),
                "diagnostics": report,
                "journal": journal,
            });
            let mut out = NewFile::create(&file)?;
            serde_json::to_writer_pretty(&mut out.out, &bundle).map_err(|e| out.failed(e))?;
            std::io::Write::write_all(&mut out.out, b"\n").map_err(|e| out.failed(e))?;
            out.finish()?;
            print(
                json,
                &serde_json::json!({"path": file, "recent_problems": problems}),
                |_| {
                    println!(
                        "saved diagnostics to {} ({problems} recent warnings and errors; journal: {journal_words})",
                        file.display()
                    )
                },
            );
        }
        Command::Resync => {
            let (checked, refetched) = client.resync().await?;
            print(
                json,
                &serde_json::json!({"attachments_checked": checked, "attachments_refetched": refetched}),
                |_| {
                    println!("full state asked for; it replaces the work orders when it comes (unsent work is kept)");
                    println!("attachments checked: {checked}, to fetch again: {refetched}");
                },
            );
        }
        Command::Export {
            file,
            from,
            to,
            all: _,
        } => {
            let since = from
                .as_deref()
                .map(|s| instant_ms(s, Edge::Start))
                .transpose()
                .map_err(Failure::Usage)?;
            let until = to
                .as_deref()
                .map(|s| instant_ms(s, Edge::End))
                .transpose()
                .map_err(Failure::Usage)?;
            let counts = export(&mut client, since, until, &file).await?;
            print(
                json,
                &serde_json::json!({"path": file, "items": counts.items, "records": counts.records, "photos": counts.photos}),
                |_| {
                    println!(
                        "exported {} items ({} records, {} photos) to {}",
                        counts.items,
                        counts.records,
                        counts.photos,
                        file.display()
                    )
                },
            );
        }
        Command::Switches {
            auto_sync,
            on_visit_completed,
            files_on_wifi_only,
        } => {
            let s = client
                .set_sync_switches(
                    auto_sync.map(OnOff::on),
                    on_visit_completed.map(OnOff::on),
                    files_on_wifi_only.map(OnOff::on),
                )
                .await?;
            let word = |b: bool| if b { "on" } else { "off" };
            print(
                json,
                &serde_json::json!({
                    "auto_sync": s.auto_sync,
                    "sync_on_visit_completed": s.sync_on_visit_completed,
                    "files_on_wifi_only": s.files_on_wifi_only,
                }),
                |_| {
                    println!("auto-sync:              {}", word(s.auto_sync));
                    println!(
                        "sync on visit complete: {}",
                        word(s.sync_on_visit_completed)
                    );
                    println!("files on Wi-Fi only:    {}", word(s.files_on_wifi_only));
                },
            );
        }
        Command::Watch => {
            client.subscribe().await?;
            loop {
                let ev = client.next_event().await?;
                print(json, &ev, print_event);
            }
        }
    }
    Ok(())
}

fn guess_mime(path: &std::path::Path) -> Option<&'static str> {
    match path.extension()?.to_str()?.to_ascii_lowercase().as_str() {
        "jpg" | "jpeg" => Some("image/jpeg"),
        "png" => Some("image/png"),
        "heic" => Some("image/heic"),
        "webp" => Some("image/webp"),
        _ => None,
    }
}

/// The daemon's last journal lines, or why there are none, and words for a person.
fn journal_of_daemon(lines: u32) -> (serde_json::Value, String) {
    let out = std::process::Command::new("journalctl")
        .args([
            "--unit",
            "fieldsyncd.service",
            "--no-pager",
            "--output",
            "short-iso",
        ])
        .arg(format!("--lines={lines}"))
        .stdin(std::process::Stdio::null())
        .output();
    match out {
        Ok(o) if o.status.success() => {
            let text = String::from_utf8_lossy(&o.stdout);
            let lines: Vec<&str> = text.lines().collect();
            let words = format!("{} lines", lines.len());
            (serde_json::json!({ "lines": lines }), words)
        }
        Ok(o) => {
            let why = format!(
                "journalctl failed ({}): {}",
                o.status,
                String::from_utf8_lossy(&o.stderr).trim()
            );
            (serde_json::json!({ "unavailable": why }), why)
        }
        Err(e) => {
            let why = format!("journalctl could not run: {e}");
            (serde_json::json!({ "unavailable": why }), why)
        }
    }
}

/// A file this run creates, which must not exist yet. Until [`NewFile::finish`] has
/// made it whole and durable, dropping it removes it: a file that exists is complete.
struct NewFile<'a> {
    path: &'a std::path::Path,
    out: std::io::BufWriter<std::fs::File>,
    done: bool,
}

impl<'a> NewFile<'a> {
    fn create(path: &'a std::path::Path) -> Result<NewFile<'a>, Failure> {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(|e| Failure::Local(format!("cannot create {}: {e}", path.display())))?;
        Ok(NewFile {
            path,
            out: std::io::BufWriter::new(file),
            done: false,
        })
    }

    fn failed(&self, e: impl std::fmt::Display) -> Failure {
        Failure::Local(format!("cannot write {}: {e}", self.path.display()))
    }

    fn finish(mut self) -> Result<(), Failure> {
        use std::io::Write;
        self.out
            .flush()
            .and_then(|_| self.out.get_ref().sync_all())
            .map_err(|e| self.failed(e))?;
        self.done = true;
        Ok(())
    }
}

impl Drop for NewFile<'_> {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_file(self.path);
        }
    }
}

#[derive(Default)]
struct ExportCounts {
    items: u64,
    records: u64,
    photos: u64,
}

/// Writes every item of `[since, until)` to a new file, page by page. Nothing is
/// written when the range holds nothing, and a file left half-written by an error is
/// removed, so a file that exists is a whole export.
async fn export(
    client: &mut Client,
    since: Option<i64>,
    until: Option<i64>,
    file: &std::path::Path,
) -> Result<ExportCounts, Failure> {
    use std::io::Write;
    const PAGE: u32 = 1000;
    let (mut items, mut next) = client.export_page(since, until, None, Some(PAGE)).await?;
    if items.is_empty() {
        return Err(Failure::Local(format!(
            "nothing was captured {}; {} not written",
            range_words(since, until),
            file.display()
        )));
    }
    let mut out = NewFile::create(file)?;
    let mut counts = ExportCounts::default();
    loop {
        for item in &items {
            let line = serde_json::to_string(item)
                .map_err(|e| Failure::Local(format!("cannot encode item {}: {e}", item.id)))?;
            writeln!(out.out, "{line}").map_err(|e| out.failed(e))?;
            counts.items += 1;
            if item.kind.is_record() {
                counts.records += 1;
            } else if item.kind == ItemKind::Photo {
                counts.photos += 1;
            }
        }
        let Some(after) = next.take() else { break };
        (items, next) = client
            .export_page(since, until, Some(after), Some(PAGE))
            .await?;
    }
    out.finish()?;
    Ok(counts)
}

fn range_words(since: Option<i64>, until: Option<i64>) -> String {
    match (since, until) {
        (None, None) => "on this device".into(),
        (Some(s), None) => format!("since {}", when(Some(s))),
        (None, Some(u)) => format!("before {}", when(Some(u))),
        (Some(s), Some(u)) => format!("from {} to {}", when(Some(s)), when(Some(u))),
    }
}

#[derive(Clone, Copy)]
enum Edge {
    /// A day means its first moment.
    Start,
    /// A day means the first moment of the next one: the day is included.
    End,
}

/// Unix milliseconds of `s`: a day (YYYY-MM-DD) in the device's local time, or an RFC
/// 3339 instant.
fn instant_ms(s: &str, edge: Edge) -> Result<i64, String> {
    if s.len() > 10 {
        let t = humantime::parse_rfc3339(s)
            .map_err(|e| format!("{s:?} is not a day (YYYY-MM-DD) or an RFC 3339 instant: {e}"))?;
        let ms = t
            .duration_since(std::time::UNIX_EPOCH)
            .map_err(|_| format!("{s:?} is before 1970"))?
            .as_millis();
        return i64::try_from(ms).map_err(|_| format!("{s:?} is too far away"));
    }
    let bad = || format!("{s:?} is not a day (YYYY-MM-DD) or an RFC 3339 instant");
    let mut parts = s.splitn(3, '-').map(|p| p.parse::<i32>().ok());
    let (Some(Some(year)), Some(Some(month)), Some(Some(day))) =
        (parts.next(), parts.next(), parts.next())
    else {
        return Err(bad());
    };
    let start = local_midnight(year, month, day).ok_or_else(bad)?;
    Ok(match edge {
        Edge::Start => start,
        // mktime carries day 32 into the next month, and so on.
        Edge::End => mktime(year, month, day + 1).ok_or_else(bad)?.0,
    })
}

/// The first moment of a real calendar day in local time, in Unix milliseconds.
fn local_midnight(year: i32, month: i32, day: i32) -> Option<i64> {
    let (ms, tm) = mktime(year, month, day)?;
    // mktime carries 2026-02-30 over to March: such a day does not exist.
    (tm.tm_year == year - 1900 && tm.tm_mon == month - 1 && tm.tm_mday == day).then_some(ms)
}

/// The C library's own reading of the local time zone (TZ, /etc/localtime), so that a
/// day means what it means everywhere else on the device.
fn mktime(year: i32, month: i32, day: i32) -> Option<(i64, libc::tm)> {
    if !(1970..=9999).contains(&year) || !(1..=12).contains(&month) || !(1..=32).contains(&day) {
        return None;
    }
    // SAFETY: an all-zero `tm` is a valid value; mktime reads and normalizes it and
    // touches nothing else.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    tm.tm_year = year - 1900;
    tm.tm_mon = month - 1;
    tm.tm_mday = day;
    // Let the C library decide whether summer time is in force that day.
    tm.tm_isdst = -1;
    // SAFETY: `tm` is a valid, exclusively borrowed struct.
    let t = unsafe { libc::mktime(&mut tm) };
    // time_t is 32 bits wide on older 32-bit ARM images.
    #[allow(clippy::useless_conversion)]
    let secs = i64::from(t);
    (t != -1).then_some((secs * 1000, tm))
}

fn print<T: serde::Serialize>(json: bool, value: &T, human: impl FnOnce(&T)) {
    if json {
        println!("{}", serde_json::to_string(value).unwrap_or_default());
    } else {
        human(value);
    }
}

fn when(ms: Option<i64>) -> String {
    match ms {
        Some(ms) if ms > 0 => {
            let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms as u64);
            humantime::format_rfc3339_seconds(t).to_string()
        }
        _ => "never".into(),
    }
}

fn state_word(s: SyncState) -> &'static str {
    match s {
        SyncState::Waiting => "waiting",
        SyncState::InProgress => "sending",
        SyncState::Delivered => "delivered",
        SyncState::Refused => "REFUSED",
    }
}

fn print_status(s: &Status) {
    println!("fieldsyncd {} (protocol {})", s.daemon_version, s.protocol);
    if s.link_detail.is_empty() {
        println!("link:           {}", s.link);
    } else {
        println!("link:           {} ({})", s.link, s.link_detail);
    }
    println!("broker session: {}", s.broker);
    if let Some(note) = &s.sync_note {
        println!("sync:           {note}");
    }
    println!(
        "switches:       auto-sync {}, files on Wi-Fi only {}",
        if s.auto_sync { "on" } else { "off" },
        if s.files_on_wifi_only { "on" } else { "off" }
    );
    println!("unsent changes: {}", s.unsent);
    println!("last sync:      {}", when(s.last_sync_ms));
    println!("last upload:    {}", when(s.last_upload_ms));
    println!("last download:  {}", when(s.last_download_ms));
    if let Some(e) = &s.last_error {
        println!("last error:     {e}");
    }
    println!(
        "storage:        {} MiB free{}",
        s.storage_free_bytes / (1024 * 1024),
        if s.storage_low {
            " (LOW: new captures refused)"
        } else {
            ""
        }
    );
    if let Some(p) = &s.damaged_store {
        println!("damaged store moved aside to {p}");
    }
    if s.resync_pending {
        println!("resync: the back office's full state is asked for and has not come yet");
    }
}

fn print_summary(w: &WorkOrderSummary) {
    println!(
        "{:<12} {:<10} next: {:<10} unsent: {:<3} {} {}{}",
        w.id,
        w.stage,
        w.next_stage.as_deref().unwrap_or("-"),
        w.unsent,
        w.scheduled_for.as_deref().unwrap_or(""),
        w.title,
        if w.withdrawn {
            " (withdrawn by the dispatcher: goes once its changes are delivered)".to_owned()
        } else if let Some(at) = w.expires_ms {
            format!(" (expires {})", when(Some(at)))
        } else {
            String::new()
        }
    );
}

fn print_detail(w: &WorkOrderDetail) {
    print_summary(&w.summary);
    if let Some(site) = &w.site {
        println!("  site: {site}");
    }
    if let Some(d) = &w.description {
        println!("  {d}");
    }
    println!("  workflow: {}", w.workflow.join(" -> "));
    for c in &w.checklist {
        println!("  checklist {}: {} ({})", c.id, c.text, c.answer);
    }
    for a in &w.attachments {
        let state = match (&a.problem, a.downloaded) {
            (_, true) => "downloaded".to_owned(),
            (Some(problem), false) => format!("not downloaded: {problem}"),
            (None, false) => "not downloaded yet".to_owned(),
        };
        println!(
            "  attachment {}: {} ({} bytes), {state}",
            a.id, a.name, a.size
        );
    }
    for i in &w.items {
        print!("  ");
        print_item(i);
    }
}

fn print_item(i: &Item) {
    let reason = i
        .reason
        .as_deref()
        .map(|r| format!(" ({r})"))
        .unwrap_or_default();
    println!(
        "{} {:<14} {:<9}{} {}",
        i.id,
        i.kind.as_str(),
        state_word(i.state),
        reason,
        i.body
    );
}

fn print_op(o: &Operation) {
    let reason = o
        .reason
        .as_deref()
        .map(|r| format!(" ({r})"))
        .unwrap_or_default();
    println!(
        "{} {} {:<6} {:<14} item {} {}{}",
        when(Some(o.created_ms)),
        o.work_order_id,
        o.action,
        o.item_kind.as_str(),
        o.item_id,
        state_word(o.state),
        reason
    );
}

fn print_event(e: &Event) {
    match e {
        Event::ItemState {
            item_id,
            work_order_id,
            kind,
            state,
            reason,
        } => println!(
            "item {item_id} ({} on {work_order_id}): {}{}",
            kind.as_str(),
            state.map_or("deleted", state_word),
            reason
                .as_deref()
                .map(|r| format!(" ({r})"))
                .unwrap_or_default()
        ),
        Event::Unsent { count } => println!("unsent changes: {count}"),
        Event::WorkOrder {
            work_order_id,
            change,
        } => println!("work order {work_order_id}: {change:?}"),
        Event::Link { link, broker, note } => match note {
            Some(note) => println!("link: {link}, broker: {broker}: {note}"),
            None => println!("link: {link}, broker: {broker}"),
        },
        Event::Lagged { missed } => println!("(missed {missed} events; state re-read advised)"),
    }
}
