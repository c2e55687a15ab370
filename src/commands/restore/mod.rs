//! `walvault restore`: rebuild a data directory from a backup, set up to
//! recover from the archive to the latest state, a target, or as a standby.

mod files;
mod flags;
mod place;
mod settings;
pub mod target;

use crate::error::{Context, Error, Result};
use crate::format::key::is_pack_id;
use crate::repository::catalog;
use crate::repository::{RepoUrl, Repository};
use place::*;
use settings::*;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
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
    let root_repo = Repository::open(url, false)?;
    let root = root_repo.require_config().await?;
    // After an upgrade the repository holds several clusters, each in its
    // own objects: the one --backup names is in one of them; anything else
    // is chosen among the current cluster's backups.
    let mut clusters = root_repo.clusters(&root);
    let several = clusters.len() > 1;
    let mut chosen = clusters
        .iter()
        .position(|c| c.current)
        .expect("a current cluster");
    if let (true, Some(id)) = (several, &opts.backup)
        && let Some(i) = catalog::holder_of(&clusters, id, "restore").await?
    {
        chosen = i;
    }
    let cluster = clusters.swap_remove(chosen);
    // restore_command names the cluster where there are several.
    let fetch_cluster = several.then(|| cluster.config.system_identifier.clone());
    let repo = Arc::new(cluster.repo);
    let backups = catalog::load_readable(&repo).await?;
    // Where complete WAL starts; an unreadable record only means "unknown".
    let retention = crate::repository::retention::load(&repo)
        .await
        .ok()
        .flatten();
    let timeline_overridden = opts
        .recovery_options
        .iter()
        .any(|(k, _)| k == "recovery_target_timeline");
    let backups = match opts.target_timeline {
        TargetTimeline::Id(n) => {
            let ancestry = target::ancestry_of(&repo, n).await?;
            target::on_lineage(&backups, n, &ancestry)
        }
        // Left to choose, never pick a backup recovery to latest refuses.
        TargetTimeline::Latest if opts.backup.is_none() && !timeline_overridden => {
            target::recoverable_to_latest(&repo, backups).await
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
    if opts.target_timeline == TargetTimeline::Latest && !timeline_overridden {
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
    write_recovery_settings(&pgdata, url, fetch_cluster.as_deref(), &manifest, opts)?;
    Ok(Restored {
        backup_id: manifest.id.clone(),
        files: manifest.files.len(),
        bytes: restored,
        pgdata,
        seconds: started.elapsed().as_secs_f64(),
    })
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
