//! `walvault restore`: rebuild a data directory from a backup, set up to
//! recover from the archive to the latest state, a target, or as a standby.

mod files;
mod flags;
pub mod target;

use crate::error::{Context, Error, Result};
use crate::format::key::is_pack_id;
use crate::format::manifest::Manifest;
use crate::repository::catalog;
use crate::repository::{RepoUrl, Repository};
use std::collections::HashMap;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;
pub use target::{RecoveryTarget, parse_time};

// The doc comments are `walvault restore --help`.
#[derive(clap::Args)]
pub struct RestoreOptions {
    /// Directory to restore into: new or empty.
    #[arg(long, env = "PGDATA")]
    pub pgdata: PathBuf,
    /// Backup id, or "latest" (default: the newest that can reach the target).
    // `None` picks by target.
    #[arg(long, env = "WALVAULT_BACKUP")]
    pub backup: Option<String>,
    #[command(flatten)]
    pub target: RecoveryTarget,
    /// What the server does at the target: promote (default), pause or shutdown.
    #[arg(long, value_parser = TargetAction::parse)]
    pub target_action: Option<TargetAction>,
    /// Set up a streaming standby (standby.signal) instead of a recovery.
    #[arg(long)]
    pub standby: bool,
    /// The primary's connection string for a standby.
    #[arg(long, requires = "standby")]
    pub primary_conninfo: Option<String>,
    /// Files restored in parallel (default: twice the number of cores).
    #[arg(long, env = "WALVAULT_JOBS")]
    pub jobs: Option<usize>,
    /// OID=DIR: restore a tablespace into DIR instead of its original location.
    #[arg(long, value_name = "OID=DIR", value_parser = parse_tablespace_mapping)]
    pub tablespace_map: Vec<(u32, PathBuf)>,
    /// Timeline to recover along: latest (default), current (the backup's) or a number.
    // PostgreSQL's default is latest too.
    #[arg(long, value_name = "latest|current|N", value_parser = TargetTimeline::parse,
          default_value = "latest", hide_default_value = true)]
    pub target_timeline: TargetTimeline,
    /// Stop just before the --time, --lsn or --xid target instead of just after it.
    #[arg(long)]
    pub target_exclusive: bool,
    /// KEY=VALUE: another setting for postgresql.auto.conf (repeatable; wins over walvault's).
    // Further `KEY = VALUE` lines for postgresql.auto.conf; they win over
    // what walvault would write for the same key.
    #[arg(long = "recovery-option", value_name = "KEY=VALUE", value_parser = parse_recovery_option)]
    pub recovery_options: Vec<(String, String)>,
    /// Whether the restored server keeps archiving into the repository: preserve (default) or off.
    #[arg(long, value_name = "preserve|off", value_parser = ArchiveMode::parse,
          default_value = "preserve", hide_default_value = true)]
    pub archive_mode: ArchiveMode,
    // Where every tablespace `tablespace_map` does not name goes, one
    // directory per OID (drill: inside its scratch directory); `None`: back
    // where it was, if that lies beside the data directory. Not an option.
    #[arg(skip)]
    pub tablespaces_under: Option<PathBuf>,
}

/// `recovery_target_action`: what the server does on reaching the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetAction {
    Promote,
    Pause,
    Shutdown,
}

impl TargetAction {
    pub fn parse(s: &str) -> Result<TargetAction> {
        match s {
            "promote" => Ok(TargetAction::Promote),
            "pause" => Ok(TargetAction::Pause),
            "shutdown" => Ok(TargetAction::Shutdown),
            _ => Err(Error::usage(format!(
                "--target-action '{s}' must be promote, pause or shutdown"
            ))),
        }
    }

    fn setting(self) -> &'static str {
        match self {
            TargetAction::Promote => "promote",
            TargetAction::Pause => "pause",
            TargetAction::Shutdown => "shutdown",
        }
    }
}

/// A `--tablespace-map OID=DIR`.
pub fn parse_tablespace_mapping(s: &str) -> Result<(u32, PathBuf)> {
    s.split_once('=')
        .and_then(|(oid, dir)| Some((oid.parse().ok()?, PathBuf::from(dir))))
        .ok_or_else(|| Error::usage(format!("--tablespace-map '{s}' is not OID=DIR")))
}

/// `recovery_target_timeline`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetTimeline {
    /// The newest timeline in the archive (PostgreSQL's default).
    Latest,
    /// The backup's own timeline.
    Current,
    Id(u32),
}

impl TargetTimeline {
    pub fn parse(s: &str) -> Result<TargetTimeline> {
        match s {
            "latest" => Ok(TargetTimeline::Latest),
            "current" => Ok(TargetTimeline::Current),
            n => match n.parse::<u32>() {
                Ok(id) if id >= 1 => Ok(TargetTimeline::Id(id)),
                _ => Err(Error::usage(format!(
                    "--target-timeline '{n}' must be latest, current or a timeline number (1 or more)"
                ))),
            },
        }
    }

    fn setting(self) -> String {
        match self {
            TargetTimeline::Latest => "latest".into(),
            TargetTimeline::Current => "current".into(),
            TargetTimeline::Id(n) => n.to_string(),
        }
    }
}

/// Whether the restored server goes on archiving into the repository.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArchiveMode {
    /// Keep the backed-up server's archive settings: once promoted, the copy
    /// archives its new timeline into the repository (and restores to latest
    /// then follow that timeline).
    Preserve,
    /// `archive_mode = off` in postgresql.auto.conf: the copy archives nothing.
    Off,
}

impl ArchiveMode {
    pub fn parse(s: &str) -> Result<ArchiveMode> {
        match s {
            "preserve" => Ok(ArchiveMode::Preserve),
            "off" => Ok(ArchiveMode::Off),
            _ => Err(Error::usage(format!(
                "--archive-mode '{s}' must be preserve or off"
            ))),
        }
    }
}

/// A `--recovery-option KEY=VALUE`: a PostgreSQL setting name (letters,
/// digits, `_` and `.`, not starting with a digit) and any value.
pub fn parse_recovery_option(s: &str) -> Result<(String, String)> {
    let bad = || {
        Error::usage(format!(
            "--recovery-option '{}' is not KEY=VALUE with KEY a PostgreSQL setting name",
            s.escape_debug()
        ))
    };
    let (key, value) = s.split_once('=').ok_or_else(bad)?;
    let key = key.trim();
    let well_formed = key
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.');
    if !well_formed || value.contains(['\n', '\r', '\0']) {
        return Err(bad());
    }
    Ok((key.to_ascii_lowercase(), value.to_string()))
}

/// What a restore did.
pub struct Restored {
    pub backup_id: String,
    pub files: usize,
    pub bytes: u64,
    pub pgdata: PathBuf,
    pub seconds: f64,
}

pub async fn run(url: &RepoUrl, opts: &RestoreOptions) -> Result<()> {
    let r = restore(url, opts).await?;
    crate::say!(
        "restored backup {} ({} files, {}) into {} in {:.1} s; {}",
        r.backup_id,
        r.files,
        crate::human::human_bytes(r.bytes),
        r.pgdata.display(),
        r.seconds,
        match (&opts.standby, &opts.target) {
            (true, _) => "start PostgreSQL on it to run a standby".to_string(),
            (_, RecoveryTarget::Latest) =>
                "start PostgreSQL on it to replay the archive to its end".into(),
            _ => "start PostgreSQL on it to recover to the target".into(),
        }
    );
    if matches!(url, RepoUrl::S3 { .. }) {
        crate::say!(
            "note: restore_command reads {url}: the server needs the same AWS_* variables in its environment"
        );
    }
    Ok(())
}

/// Restores without printing (drill reports on its own).
pub async fn restore(url: &RepoUrl, opts: &RestoreOptions) -> Result<Restored> {
    let started = Instant::now();
    if opts.standby && opts.target != RecoveryTarget::Latest {
        return Err(Error::usage(
            "--standby follows the primary; it takes no recovery target",
        ));
    }
    if opts.target_exclusive
        && !matches!(
            opts.target,
            RecoveryTarget::Time(_) | RecoveryTarget::Lsn(_) | RecoveryTarget::Xid(_)
        )
    {
        return Err(Error::usage(
            "--target-exclusive needs a --time, --lsn or --xid target",
        ));
    }
    if opts.standby && opts.target_timeline != TargetTimeline::Latest {
        return Err(Error::usage(
            "--standby follows the primary's timeline; it takes no --target-timeline",
        ));
    }
    let repo = Arc::new(Repository::open(url, false)?);
    repo.require_config().await?;
    let backups = catalog::load_readable(&repo).await?;
    // Where complete WAL starts; an unreadable record only means "unknown".
    let retention = crate::repository::retention::load(&repo)
        .await
        .ok()
        .flatten();
    let backups = match opts.target_timeline {
        TargetTimeline::Id(n) => {
            let ancestry = target::ancestry_of(&repo, n).await?;
            target::on_lineage(&backups, n, &ancestry)
        }
        _ => backups,
    };
    if backups.is_empty() {
        return Err(Error::not_found(format!(
            "no backup lies on the history of timeline {}; 'walvault status' shows the timelines",
            opts.target_timeline.setting()
        )));
    }
    let manifest = opts
        .target
        .choose(&backups, opts.backup.as_deref(), retention.as_ref())?
        .clone();
    manifest.check_paths()?;
    if opts.target_timeline == TargetTimeline::Latest
        && !opts
            .recovery_options
            .iter()
            .any(|(k, _)| k == "recovery_target_timeline")
    {
        target::warn_about_latest(&repo, &manifest).await;
    }
    if let Some(bad) = manifest
        .files
        .iter()
        .flat_map(|f| &f.chunks)
        .find(|c| !is_pack_id(&c.pack))
    {
        return Err(Error::corrupt(format!(
            "backup {} refers to pack '{}', which is not a pack id; refusing it",
            manifest.id,
            bad.pack.escape_debug()
        )));
    }
    let pgdata = prepare_empty_dir(&opts.pgdata, "--pgdata")?;
    let mut map = opts.tablespace_map.clone();
    if let Some(root) = &opts.tablespaces_under {
        for t in &manifest.tablespaces {
            if !map.iter().any(|(oid, _)| *oid == t.oid) {
                map.push((t.oid, root.join(format!("tblspc-{}", t.oid))));
            }
        }
    }
    let locations = tablespace_locations(&manifest, &pgdata, &map)?;
    let dest_of = |path: &str| -> PathBuf { destination(&pgdata, &locations, path) };

    for dir in &manifest.directories {
        let dest = dest_of(&dir.path);
        make_dir(&dest)?;
        std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(dir_mode(dir.mode)))
            .context(|| format!("cannot set mode of {}", dest.display()))?;
    }
    for extra in ["pg_wal/archive_status", "pg_tblspc"] {
        make_dir(&pgdata.join(extra))?;
    }

    let files = Arc::new(manifest.files.clone());
    let dests: Arc<Vec<PathBuf>> = Arc::new(files.iter().map(|f| dest_of(&f.path)).collect());
    for d in dests.iter() {
        if let Some(parent) = d.parent() {
            make_dir(parent)?;
        }
    }
    let next = Arc::new(AtomicUsize::new(0));
    let mut workers = vec![];
    for _ in 0..opts.jobs.unwrap_or(2 * crate::commands::cores()).max(1) {
        let (repo, files, dests, next) = (repo.clone(), files.clone(), dests.clone(), next.clone());
        let rt = tokio::runtime::Handle::current();
        workers.push(tokio::task::spawn_blocking(move || {
            let mut bytes = 0u64;
            let mut buffer = files::ChunkBuffer::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(entry) = files.get(i) else { break };
                bytes += files::restore_file(&repo, &rt, entry, &dests[i], &mut buffer)?;
            }
            Ok::<_, Error>(bytes)
        }));
    }
    let mut restored = 0u64;
    let mut first_error = None;
    for w in workers {
        match w
            .await
            .map_err(|e| Error::io(format!("restore worker failed: {e}")))?
        {
            Ok(b) => restored += b,
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    if let Some(e) = first_error {
        return Err(Error::new(
            e.kind,
            format!(
                "{e}; the restore in {} is incomplete, do not start it",
                pgdata.display()
            ),
        ));
    }

    // One flush of the whole filesystem instead of an fsync per file.
    sync_filesystems(std::iter::once(&pgdata).chain(locations.values()))?;

    let write = |name: &str, text: &str| -> Result<()> {
        write_private_file(&pgdata.join(name), text.as_bytes())
    };
    write("backup_label", &manifest.backup_label)?;
    if let Some(map) = tablespace_map_text(&manifest, &locations) {
        write("tablespace_map", &map)?;
    }
    write_recovery_settings(&pgdata, url, &manifest, opts)?;
    Ok(Restored {
        backup_id: manifest.id.clone(),
        files: manifest.files.len(),
        bytes: restored,
        pgdata,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Makes everything written under each directory durable (syncfs: one call
/// per filesystem, far cheaper than an fsync per file for thousands of files).
fn sync_filesystems<'a>(dirs: impl Iterator<Item = &'a PathBuf>) -> Result<()> {
    use std::os::fd::AsRawFd;
    for dir in dirs {
        let handle =
            std::fs::File::open(dir).context(|| format!("cannot open {}", dir.display()))?;
        // SAFETY: syncfs only reads the descriptor, which `handle` keeps open.
        if unsafe { libc::syncfs(handle.as_raw_fd()) } != 0 {
            return Err(Error::io(format!(
                "cannot sync the filesystem of {}: {}",
                dir.display(),
                std::io::Error::last_os_error()
            )));
        }
    }
    Ok(())
}

/// An empty directory of ours, created 0700 if missing; anything else is
/// refused. A directory another user owns is refused too: its owner could
/// plant links in it while the restore writes, and a restore run as root
/// would follow them.
fn prepare_empty_dir(dir: &Path, what: &str) -> Result<PathBuf> {
    match std::fs::symlink_metadata(dir) {
        Ok(meta) if meta.is_dir() => {
            check_owner(dir, &meta, what)?;
            let refuse_unless_empty = || -> Result<()> {
                let mut entries =
                    std::fs::read_dir(dir).context(|| format!("cannot read {}", dir.display()))?;
                if entries.next().is_some() {
                    return Err(Error::usage(format!(
                        "{what} {} is not empty; restore into an empty or new directory",
                        dir.display()
                    )));
                }
                Ok(())
            };
            refuse_unless_empty()?;
            // Closed, then checked again: nothing can have slipped in since.
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                .context(|| format!("cannot set mode of {}", dir.display()))?;
            refuse_unless_empty()?;
        }
        Ok(_) => {
            return Err(Error::usage(format!(
                "{what} {} exists and is not a directory",
                dir.display()
            )));
        }
        Err(_) => {
            if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                std::fs::create_dir_all(parent)
                    .context(|| format!("cannot create {}", parent.display()))?;
            }
            // Made here, 0700 from the start, failing if anything appeared.
            std::fs::DirBuilder::new()
                .mode(0o700)
                .create(dir)
                .context(|| format!("cannot create {}", dir.display()))?;
        }
    }
    let resolved = dir
        .canonicalize()
        .context(|| format!("cannot resolve {}", dir.display()))?;
    // What the path leads to now must still be our own directory.
    let meta = std::fs::symlink_metadata(&resolved)
        .context(|| format!("cannot read {}", resolved.display()))?;
    if !meta.is_dir() {
        return Err(Error::usage(format!(
            "{what} {} changed while restore prepared it; restore into a directory only you can write",
            dir.display()
        )));
    }
    check_owner(&resolved, &meta, what)?;
    Ok(resolved)
}

fn check_owner(dir: &Path, meta: &std::fs::Metadata, what: &str) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != me {
        return Err(Error::usage(format!(
            "{what} {} belongs to uid {}, not to the user running restore (uid {me}); run restore as its owner or give a new directory",
            dir.display(),
            meta.uid()
        )));
    }
    Ok(())
}

/// A directory inside the restore (parents included), never reached through
/// a link: each component must be a real directory once made.
fn make_dir(dir: &Path) -> Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .context(|| format!("cannot create {}", dir.display()))?;
    match std::fs::symlink_metadata(dir) {
        Ok(meta) if meta.is_dir() => Ok(()),
        _ => Err(Error::usage(format!(
            "{} is not a directory of the restore (a link?); restore into a directory only you can write",
            dir.display()
        ))),
    }
}

/// Writes a file of the restored data directory atomically. Its temporary
/// file is created new and never through a link, so nothing planted under
/// its name is truncated or written through.
fn write_private_file(path: &Path, data: &[u8]) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(Error::usage(format!(
            "'{}' is not a file path",
            path.display()
        )));
    };
    let tmp = dir.join(format!(
        ".{}.walvault-{}.tmp",
        name.to_string_lossy(),
        std::process::id()
    ));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)
        .context(|| format!("cannot create {}", tmp.display()))?;
    let result = file
        .write_all(data)
        .and_then(|()| file.sync_all())
        .and_then(|()| std::fs::rename(&tmp, path))
        .context(|| format!("cannot write {}", path.display()));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .context(|| format!("cannot fsync directory {}", dir.display()))
}

/// Where each tablespace goes: `--tablespace-map`, else where it was.
fn tablespace_locations(
    manifest: &Manifest,
    pgdata: &Path,
    map: &[(u32, PathBuf)],
) -> Result<HashMap<u32, PathBuf>> {
    let mut out = HashMap::new();
    for t in &manifest.tablespaces {
        let mapped = map
            .iter()
            .find(|(oid, _)| *oid == t.oid)
            .map(|(_, p)| p.clone());
        let target = match mapped {
            Some(p) => p,
            None => unmapped_location(manifest, t, pgdata)?,
        };
        if !target.is_absolute() {
            return Err(Error::usage(format!(
                "tablespace {} location {} must be absolute",
                t.oid,
                target.display()
            )));
        }
        let target = prepare_empty_dir(&target, &format!("tablespace {} location", t.oid))?;
        if target.starts_with(pgdata) {
            return Err(Error::usage(format!(
                "tablespace {} location {} is inside the data directory; map it elsewhere with --tablespace-map {}=DIR",
                t.oid,
                target.display(),
                t.oid
            )));
        }
        out.insert(t.oid, target);
    }
    Ok(out)
}

/// A tablespace's recorded location, restored there without being asked only
/// when it lies beside the data directory (under its parent): the manifest is
/// data from the repository, and anywhere else it would make and fill a
/// directory wherever it says.
fn unmapped_location(
    manifest: &Manifest,
    t: &crate::format::manifest::Tablespace,
    pgdata: &Path,
) -> Result<PathBuf> {
    use std::path::Component;
    let location = PathBuf::from(&t.location);
    let parent = pgdata.parent().filter(|p| p.parent().is_some());
    let beside = location.is_absolute()
        && location
            .components()
            .all(|c| matches!(c, Component::RootDir | Component::Normal(_)))
        && parent.is_some_and(|p| location.starts_with(p));
    if beside {
        return Ok(location);
    }
    Err(Error::usage(format!(
        "backup {} has tablespace {} at {}, outside {}; say where it goes with --tablespace-map {}=DIR (its old path to restore it there)",
        manifest.id,
        t.oid,
        t.location.escape_debug(),
        parent.unwrap_or(pgdata).display(),
        t.oid
    )))
}

/// Files under `pg_tblspc/<oid>/` go to the tablespace's location; all others
/// under the data directory. Paths were checked by `Manifest::check_paths`.
fn destination(pgdata: &Path, locations: &HashMap<u32, PathBuf>, path: &str) -> PathBuf {
    if let Some(rest) = path.strip_prefix("pg_tblspc/") {
        let (oid, inner) = rest.split_once('/').unwrap_or((rest, ""));
        if let Some(loc) = oid.parse().ok().and_then(|o: u32| locations.get(&o)) {
            return if inner.is_empty() {
                loc.clone()
            } else {
                loc.join(inner)
            };
        }
    }
    pgdata.join(path)
}

/// Directory modes as PostgreSQL makes them (0700, or 0750 with group
/// access): a manifest cannot ask for setuid, sticky or world bits.
pub fn dir_mode(mode: u32) -> u32 {
    (mode & 0o750) | 0o700
}

/// File modes likewise: 0600, or 0640 with group access.
pub fn file_mode(mode: u32) -> u32 {
    (mode & 0o640) | 0o600
}

/// Built from the checked tablespace list only, never from the manifest's
/// raw text: PostgreSQL makes a symlink for every line of it.
fn tablespace_map_text(manifest: &Manifest, locations: &HashMap<u32, PathBuf>) -> Option<String> {
    if manifest.tablespaces.is_empty() {
        return None;
    }
    Some(
        manifest
            .tablespaces
            .iter()
            .map(|t| format!("{} {}\n", t.oid, locations[&t.oid].display()))
            .collect(),
    )
}

/// Every parameter that names a recovery target; PostgreSQL refuses more than one set.
const RECOVERY_TARGET_KEYS: [&str; 5] = [
    "recovery_target",
    "recovery_target_time",
    "recovery_target_lsn",
    "recovery_target_xid",
    "recovery_target_name",
];

/// Quotes a word for the shell PostgreSQL runs restore_command through.
fn shell_word(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_/.:=@+-,".contains(&b))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

fn write_recovery_settings(
    pgdata: &Path,
    url: &RepoUrl,
    manifest: &Manifest,
    opts: &RestoreOptions,
) -> Result<()> {
    use target::conf_quote;
    let exe =
        std::env::current_exe().context(|| "cannot find this walvault binary's path".into())?;
    let restore_command = format!(
        "{} --repo {} fetch %f %p",
        shell_word(&exe.to_string_lossy()),
        shell_word(&url.to_string())
    );
    // Old recovery settings go (the backed-up server may itself be a
    // restored one, whose target would still apply); ours are appended.
    // Unused targets are left out, not set to '': PostgreSQL counts an
    // emptied target assigned after a set one as a second target.
    let mut settings: Vec<(String, String)> = vec![
        ("restore_command".into(), restore_command),
        (
            "recovery_target_timeline".into(),
            opts.target_timeline.setting(),
        ),
    ];
    settings.extend(
        opts.target
            .settings()
            .into_iter()
            .map(|(k, v)| (k.to_string(), v)),
    );
    if opts.target_exclusive {
        settings.push(("recovery_target_inclusive".into(), "false".into()));
    }
    if opts.target != RecoveryTarget::Latest {
        let action = opts.target_action.unwrap_or(TargetAction::Promote);
        settings.push(("recovery_target_action".into(), action.setting().into()));
    }
    if let Some(c) = &opts.primary_conninfo {
        settings.push(("primary_conninfo".into(), c.clone()));
    }
    if opts.archive_mode == ArchiveMode::Off {
        settings.push(("archive_mode".into(), "off".into()));
    }
    // The operator's own options win: one line per key, theirs last.
    for (k, v) in &opts.recovery_options {
        settings.retain(|(key, _)| key != k);
        settings.push((k.clone(), v.clone()));
    }
    let ours: Vec<String> = settings.iter().map(|(k, _)| k.clone()).collect();
    let managed = |key: &str| {
        RECOVERY_TARGET_KEYS.contains(&key)
            || [
                "restore_command",
                "recovery_target_timeline",
                "recovery_target_action",
                "recovery_target_inclusive",
                "primary_conninfo",
            ]
            .contains(&key)
            || ours.iter().any(|k| k == key)
    };
    let auto = pgdata.join("postgresql.auto.conf");
    let previous = read_regular_file(&auto)?;
    let mut text: String = previous
        .lines()
        .filter(|line| !managed(line.split('=').next().unwrap_or("").trim()))
        .map(|line| format!("{line}\n"))
        .collect();
    text.push_str(&format!(
        "# added by walvault restore of backup {} at {}\n",
        manifest.id,
        chrono::Utc::now().to_rfc3339()
    ));
    for (k, v) in &settings {
        text.push_str(&format!("{k} = {}\n", conf_quote(v)));
    }
    write_private_file(&auto, text.as_bytes())?;
    let signal = if opts.standby {
        "standby.signal"
    } else {
        "recovery.signal"
    };
    write_private_file(&pgdata.join(signal), b"")
}

/// A restored file's text, never read through a link; empty when missing.
fn read_regular_file(path: &Path) -> Result<String> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let mut text = String::new();
    match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
    {
        Ok(mut f) => {
            f.read_to_string(&mut text)
                .context(|| format!("cannot read {}", path.display()))?;
            Ok(text)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(text),
        Err(e) => Err(Error::io(format!("cannot read {}: {e}", path.display()))),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn recovery_option_values() {
        use super::*;
        assert_eq!(
            parse_recovery_option("work_mem=7MB").unwrap(),
            ("work_mem".into(), "7MB".into())
        );
        assert_eq!(
            parse_recovery_option("Primary_Slot_Name = a=b").unwrap(),
            ("primary_slot_name".into(), " a=b".into())
        );
        assert_eq!(
            parse_recovery_option("auto_explain.log_min_duration=0")
                .unwrap()
                .0,
            "auto_explain.log_min_duration"
        );
        for bad in [
            "",
            "=1",
            "no_equals",
            "bad key=1",
            "1x=2",
            "k=a\nrestore_command=x",
            "k;=1",
        ] {
            assert!(parse_recovery_option(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            TargetTimeline::parse("latest").unwrap(),
            TargetTimeline::Latest
        );
        assert_eq!(
            TargetTimeline::parse("current").unwrap(),
            TargetTimeline::Current
        );
        assert_eq!(TargetTimeline::parse("3").unwrap(), TargetTimeline::Id(3));
        for bad in ["0", "-1", "x", ""] {
            assert!(TargetTimeline::parse(bad).is_err(), "{bad:?}");
        }
        assert!(ArchiveMode::parse("off").is_ok() && ArchiveMode::parse("on").is_err());
    }

    #[test]
    fn a_planted_link_at_the_temporary_name_is_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"untouched").unwrap();
        let tmp = dir
            .path()
            .join(format!(".backup_label.walvault-{}.tmp", std::process::id()));
        std::os::unix::fs::symlink(&victim, &tmp).unwrap();
        let label = dir.path().join("backup_label");
        assert!(super::write_private_file(&label, b"label").is_err());
        assert_eq!(std::fs::read(&victim).unwrap(), b"untouched");
        assert!(!label.exists());
        // Without the link it writes, and leaves no temporary file.
        std::fs::remove_file(&tmp).unwrap();
        super::write_private_file(&label, b"label").unwrap();
        assert_eq!(std::fs::read(&label).unwrap(), b"label");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
    }

    #[test]
    fn modes_are_clamped() {
        assert_eq!(super::dir_mode(0o7777), 0o750);
        assert_eq!(super::dir_mode(0o700), 0o700);
        assert_eq!(super::file_mode(0o6777), 0o640);
        assert_eq!(super::file_mode(0o600), 0o600);
        assert_eq!(super::file_mode(0), 0o600);
    }
}
