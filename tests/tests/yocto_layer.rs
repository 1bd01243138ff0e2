//! The Yocto layer against the repository it ships in: every file the recipe installs
//! exists here, every unit here is installed, and the crate list is Cargo.lock's. A full
//! bitbake build cannot run in CI, so these are the mistakes caught before an integrator's
//! build would.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};

const LAYER: &str = "yocto-layer/meta-fieldsync";
const RECIPE: &str = "yocto-layer/meta-fieldsync/recipes-fieldsync/fieldsync/fieldsync_git.bb";
const CRATES_INC: &str =
    "yocto-layer/meta-fieldsync/recipes-fieldsync/fieldsync/fieldsync-crates.inc";
const REGENERATE: &str = "run scripts/gen-crates-inc.py";

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate sits in the workspace root")
        .to_owned()
}

fn read(relative: &str) -> Result<String> {
    let path = repo_root().join(relative);
    fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
}

/// The recipe's `do_install` body as shell commands, continuation lines joined.
fn do_install_commands(recipe: &str) -> Result<Vec<String>> {
    let mut lines = recipe
        .lines()
        .skip_while(|l| !l.starts_with("do_install()"));
    ensure!(lines.next().is_some(), "{RECIPE} has no do_install()");
    let mut commands = Vec::new();
    let mut current = String::new();
    for line in lines {
        if line == "}" {
            return Ok(commands);
        }
        let line = line.trim();
        if let Some(head) = line.strip_suffix('\\') {
            current.push_str(head);
            current.push(' ');
            continue;
        }
        current.push_str(line);
        if !current.is_empty() && !current.starts_with('#') {
            commands.push(std::mem::take(&mut current));
        }
        current.clear();
    }
    bail!("{RECIPE}: do_install() is not closed by a line holding only `}}`")
}

/// Where an installed file comes from.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Source {
    /// A file of this repository, by its path from the root (`${S}` is the checkout).
    Repo(String),
    /// A binary cargo built, by its name.
    Binary(String),
    /// One of the integrator's `FIELDSYNC_CONFIG_FRAGMENTS`, unknown to the repository.
    IntegratorFragment,
}

/// The source operands of every `install` that copies files (not `install -d`).
fn installed_sources(commands: &[String]) -> Result<Vec<Source>> {
    let mut sources = Vec::new();
    for command in commands {
        let words: Vec<&str> = command.split_whitespace().collect();
        if words.first() != Some(&"install") || words.contains(&"-d") {
            continue;
        }
        let mut operands = Vec::new();
        let mut args = words[1..].iter();
        while let Some(arg) = args.next() {
            match *arg {
                // Options that take a value.
                "-m" | "-o" | "-g" | "-t" => {
                    args.next();
                }
                a if a.starts_with('-') => {}
                a => operands.push(a),
            }
        }
        ensure!(operands.len() >= 2, "cannot read `{command}` in do_install");
        for source in &operands[..operands.len() - 1] {
            sources.push(classify(source).with_context(|| format!("in `{command}`"))?);
        }
    }
    Ok(sources)
}

fn classify(source: &str) -> Result<Source> {
    if let Some(path) = source.strip_prefix("${S}/") {
        return Ok(Source::Repo(path.to_owned()));
    }
    if let Some(name) = source.strip_prefix("${B}/target/${CARGO_TARGET_SUBDIR}/") {
        return Ok(Source::Binary(name.to_owned()));
    }
    if source == "${FIELDSYNC_UNPACKED}/$fragment" {
        return Ok(Source::IntegratorFragment);
    }
    bail!(
        "source {source} maps to no repository file: name files as ${{S}}/<path in the \
         repository> so this test can check them"
    )
}

/// `[[bin]]` names declared by the workspace's packages.
fn workspace_binaries() -> Result<BTreeSet<String>> {
    let mut names = BTreeSet::new();
    for manifest in ["daemon/Cargo.toml", "ui-bridge/Cargo.toml"] {
        let text = read(manifest)?;
        let mut in_bin = false;
        for line in text.lines().map(str::trim) {
            if line.starts_with('[') {
                in_bin = line == "[[bin]]";
            } else if in_bin {
                if let Some(value) = string_value(line, "name") {
                    names.insert(value);
                }
            }
        }
    }
    Ok(names)
}

/// The string of a `key = "value"` line, for the TOML and bitbake lines read here.
fn string_value(line: &str, key: &str) -> Option<String> {
    let rest = line.strip_prefix(key)?.trim_start();
    let rest = rest.strip_prefix('=')?.trim();
    Some(rest.strip_prefix('"')?.strip_suffix('"')?.to_owned())
}

/// A bitbake assignment's value, continuation lines joined.
fn bitbake_value(recipe: &str, var: &str) -> Result<String> {
    let prefix = format!("{var} = \"");
    let mut lines = recipe.lines();
    while let Some(line) = lines.next() {
        let Some(first) = line.strip_prefix(&prefix) else {
            continue;
        };
        let mut value = String::new();
        let mut line = first;
        while let Some(head) = line.trim_end().strip_suffix('\\') {
            value.push_str(head);
            line = lines
                .next()
                .context("continued assignment runs off the end")?;
        }
        value.push_str(line.trim_end().trim_end_matches('"'));
        return Ok(value.split_whitespace().collect::<Vec<_>>().join(" "));
    }
    bail!("{RECIPE} does not assign {var}")
}

#[test]
fn every_installed_file_exists_in_the_repository() -> Result<()> {
    let recipe = read(RECIPE)?;
    let sources = installed_sources(&do_install_commands(&recipe)?)?;
    let binaries = workspace_binaries()?;
    let root = repo_root();
    let mut missing = Vec::new();
    for source in &sources {
        match source {
            Source::Repo(path) if !root.join(path).is_file() => missing.push(path.clone()),
            Source::Binary(name) if !binaries.contains(name) => {
                missing.push(format!("binary {name} (the workspace builds {binaries:?})"));
            }
            _ => {}
        }
    }
    ensure!(
        missing.is_empty(),
        "{RECIPE} installs what the repository lacks: {missing:?}"
    );

    // What a device cannot run without.
    let expected = [
        Source::Binary("fieldsyncd".into()),
        Source::Binary("fieldctl".into()),
        Source::Repo("systemd/fieldsyncd.service".into()),
        Source::Repo("systemd/fieldsyncd.socket".into()),
        Source::Repo("systemd/sysusers.d/fieldsync.conf".into()),
        Source::Repo("systemd/tmpfiles.d/fieldsync.conf".into()),
        Source::Repo("daemon/config/fieldsyncd.toml".into()),
    ];
    let lacking: Vec<_> = expected.iter().filter(|e| !sources.contains(e)).collect();
    ensure!(lacking.is_empty(), "{RECIPE} does not install {lacking:?}");
    Ok(())
}

#[test]
fn every_unit_and_companion_is_installed() -> Result<()> {
    let recipe = read(RECIPE)?;
    let sources = installed_sources(&do_install_commands(&recipe)?)?;
    let mut shipped = BTreeSet::new();
    let mut pending = vec![repo_root().join("systemd")];
    while let Some(dir) = pending.pop() {
        for entry in fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))? {
            let path = entry?.path();
            if path.is_dir() {
                pending.push(path);
            } else {
                let relative = path
                    .strip_prefix(repo_root())?
                    .to_string_lossy()
                    .into_owned();
                shipped.insert(relative);
            }
        }
    }
    let left_out: Vec<_> = shipped
        .iter()
        .filter(|p| !sources.contains(&Source::Repo((*p).clone())))
        .collect();
    ensure!(left_out.is_empty(), "{RECIPE} leaves out {left_out:?}");

    // systemd.bbclass enables exactly what SYSTEMD_SERVICE names.
    let units: BTreeSet<String> = shipped
        .iter()
        .filter(|p| p.ends_with(".service") || p.ends_with(".socket"))
        .map(|p| p.rsplit('/').next().unwrap_or(p).to_owned())
        .collect();
    let enabled: BTreeSet<String> = bitbake_value(&recipe, "SYSTEMD_SERVICE:${PN}")?
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    ensure!(
        units == enabled,
        "SYSTEMD_SERVICE names {enabled:?}, systemd/ holds {units:?}"
    );
    Ok(())
}

#[test]
fn ui_group_substitution_has_something_to_replace() -> Result<()> {
    // do_install rewrites fieldsync-ui into FIELDSYNC_UI_GROUP; if the default name left
    // these files, an integrator's group setting would silently change nothing.
    let socket = read("systemd/fieldsyncd.socket")?;
    ensure!(
        socket.lines().any(|l| l == "SocketGroup=fieldsync-ui"),
        "fieldsyncd.socket"
    );
    let sysusers = read("systemd/sysusers.d/fieldsync.conf")?;
    ensure!(
        sysusers
            .lines()
            .any(|l| l.split_whitespace().take(2).eq(["g", "fieldsync-ui"])),
        "sysusers.d/fieldsync.conf creates no fieldsync-ui group"
    );
    let recipe = read(RECIPE)?;
    ensure!(
        recipe.contains("FIELDSYNC_UI_GROUP ??= \"fieldsync-ui\""),
        "{RECIPE}"
    );
    Ok(())
}

#[test]
fn recipe_version_is_the_workspace_version() -> Result<()> {
    let manifest = read("Cargo.toml")?;
    let mut in_package = false;
    let mut version = None;
    for line in manifest.lines().map(str::trim) {
        if line.starts_with('[') {
            in_package = line == "[workspace.package]";
        } else if in_package {
            version = version.or_else(|| string_value(line, "version"));
        }
    }
    let version = version.context("Cargo.toml has no [workspace.package] version")?;
    let pv = bitbake_value(&read(RECIPE)?, "PV")?;
    ensure!(
        pv == format!("{version}+git"),
        "PV is {pv:?}, the workspace is {version}"
    );
    Ok(())
}

/// `(name, version) -> checksum` of Cargo.lock's crates.io packages.
fn lock_registry_packages() -> Result<BTreeMap<(String, String), String>> {
    let lock = read("Cargo.lock")?;
    let mut packages = BTreeMap::new();
    for block in lock.split("[[package]]").skip(1) {
        let field = |key| block.lines().find_map(|l| string_value(l.trim(), key));
        let (Some(name), Some(version)) = (field("name"), field("version")) else {
            bail!("Cargo.lock has a package without name or version: {block}");
        };
        match field("source") {
            // Workspace members come with the source tree.
            None => {}
            Some(source) if source.contains("crates.io") => {
                let checksum = field("checksum")
                    .with_context(|| format!("Cargo.lock: {name} {version} has no checksum"))?;
                packages.insert((name, version), checksum);
            }
            Some(source) => bail!(
                "Cargo.lock: {name} {version} comes from {source}, which the recipe cannot \
                 fetch as a crate"
            ),
        }
    }
    Ok(packages)
}

#[test]
fn crates_include_lists_exactly_the_registry_packages_of_cargo_lock() -> Result<()> {
    let inc = read(CRATES_INC)?;
    let mut listed = BTreeSet::new();
    let mut checksums = BTreeMap::new();
    for line in inc.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("crate://crates.io/") {
            let uri = rest.trim_end_matches('\\').trim();
            let (path, params) = uri.split_once(';').unwrap_or((uri, ""));
            let (name, version) = path
                .split_once('/')
                .with_context(|| format!("{CRATES_INC}: cannot read crate://{uri}"))?;
            let key = (name.to_owned(), version.to_owned());
            ensure!(
                params == format!("name={name}-{version}"),
                "{CRATES_INC}: crate://{uri} must be named {name}-{version} for its checksum"
            );
            ensure!(listed.insert(key), "{CRATES_INC} lists {uri} twice");
        } else if let Some(rest) = line.strip_prefix("SRC_URI[") {
            let (key, value) = rest
                .split_once(".sha256sum] = ")
                .with_context(|| format!("{CRATES_INC}: cannot read {line}"))?;
            checksums.insert(key.to_owned(), value.trim_matches('"').to_owned());
        }
    }

    let lock = lock_registry_packages()?;
    let locked: BTreeSet<_> = lock.keys().cloned().collect();
    let missing: Vec<_> = locked.difference(&listed).collect();
    let stale: Vec<_> = listed.difference(&locked).collect();
    ensure!(
        missing.is_empty() && stale.is_empty(),
        "{CRATES_INC} is out of date ({REGENERATE}): missing {missing:?}, not in Cargo.lock \
         {stale:?}"
    );
    for ((name, version), checksum) in &lock {
        let in_inc = checksums.get(&format!("{name}-{version}"));
        ensure!(
            in_inc == Some(checksum),
            "{CRATES_INC}: {name} {version} has checksum {in_inc:?}, Cargo.lock says \
             {checksum} ({REGENERATE})"
        );
    }
    ensure!(
        checksums.len() == lock.len(),
        "{CRATES_INC} has checksums for crates it does not fetch ({REGENERATE})"
    );
    Ok(())
}

#[test]
fn layer_declares_the_series_its_kas_files_build() -> Result<()> {
    let conf = read(&format!("{LAYER}/conf/layer.conf"))?;
    let compat = conf
        .lines()
        .find_map(|l| string_value(l, "LAYERSERIES_COMPAT_fieldsync"))
        .context("layer.conf has no LAYERSERIES_COMPAT_fieldsync")?;
    for (kas, branch) in [
        ("kas/qemuarm64.yml", "wrynose"),
        ("kas/qemuarm64-scarthgap.yml", "scarthgap"),
    ] {
        let text = read(&format!("{LAYER}/{kas}"))?;
        ensure!(
            text.contains(&format!("branch: {branch}")),
            "{kas} does not build {branch}"
        );
        ensure!(
            compat.split_whitespace().any(|s| s == branch),
            "{kas} builds {branch}, which LAYERSERIES_COMPAT_fieldsync ({compat}) leaves out"
        );
    }
    // From wrynose on, bitbake is a repository of its own, and openembedded-core's
    // sanity check refuses one older than its BB_MIN_VERSION (2.18.0 for wrynose).
    let wrynose = read(&format!("{LAYER}/kas/qemuarm64.yml"))?;
    let bitbake = wrynose
        .split("\n  bitbake:")
        .nth(1)
        .and_then(|repo| repo.lines().find_map(|l| l.trim().strip_prefix("branch:")))
        .context("kas/qemuarm64.yml has no bitbake repository with a branch")?;
    ensure!(
        bitbake.trim().trim_matches('"') == "2.18",
        "kas/qemuarm64.yml checks out bitbake {bitbake}; wrynose needs 2.18"
    );
    Ok(())
}

/// From styhead on, oe-core sets UNPACKDIR itself and stops a recipe that points it at
/// WORKDIR; a recipe's own `??=` would win over oe-core's (the last weak default parsed
/// is the one kept).
#[test]
fn the_recipe_leaves_unpackdir_to_the_series() -> Result<()> {
    let recipe = read(RECIPE)?;
    let assigns = recipe
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .find(|l| l.trim_start().starts_with("UNPACKDIR"));
    ensure!(assigns.is_none(), "{RECIPE} assigns UNPACKDIR: {assigns:?}");
    Ok(())
}
