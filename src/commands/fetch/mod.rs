//! `walvault fetch <name> <path>`: PostgreSQL's restore_command.
//!
//! Recovery asks for one segment at a time and waits for each; with
//! `--prefetch K` a background worker downloads the following K segments of
//! the same timeline in parallel into the spool while recovery replays, so
//! most calls are a local, verified rename.
//!
//! This module is the orchestration (who called, the spool, the worker);
//! `file` fetches one object, `gap` tells the end of the archive from a gap,
//! `ahead` is the prefetch worker.

mod ahead;
mod file;
mod gap;

use ahead::successors;
pub use ahead::{AheadOptions, run_ahead};
use file::{deliver, fetch_from_repository, hand_over};
use gap::{Gap, gap_at, gap_error};

use crate::ahead::spool::{RepoBinding, Spool, WorkerKind};
use crate::error::{Error, Result};
use crate::format::key::wal_key;
use crate::format::object::Sha256Digest;
use crate::pg::wal::{SegmentName, WalFileName};
use crate::repository::{Cluster, RepoUrl, Repository, RepositoryConfig};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

// The doc comments are `walvault fetch --help`.
#[derive(clap::Args)]
pub struct FetchOptions {
    /// %f: the file name PostgreSQL asks for.
    pub name: String,
    /// %p: where to write it, relative to the data directory.
    pub path: PathBuf,
    /// Download up to K following segments in parallel ahead of recovery (0: off;
    /// default: as many as fit in 256 MiB, at most 64).
    // `None`: as many as fit in [`PREFETCH_BUDGET`].
    #[arg(long, env = "WALVAULT_PREFETCH")]
    pub prefetch: Option<usize>,
    /// Scratch directory for work done ahead (default: pg_wal/walvault-spool).
    #[arg(long, env = "WALVAULT_SPOOL")]
    pub spool: Option<PathBuf>,
    /// The system identifier of the cluster whose WAL to fetch, in a
    /// repository that holds several (walvault restore writes it); default:
    /// the cluster archiving there now.
    #[arg(long)]
    pub cluster: Option<String>,
}

/// Whose WAL a fetch delivers, in a repository that holds several
/// clusters' (after an upgrade).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Which<'a> {
    /// The cluster `--cluster` names (walvault restore writes it).
    Named(&'a str),
    /// The cluster whose data directory `%p` lies in: a segment of the same
    /// name from another cluster would be taken by PostgreSQL for the end
    /// of the archive.
    Recovering(&'a str),
    /// Neither known: the cluster archiving there now.
    Current,
}

impl<'a> Which<'a> {
    fn of(given: Option<&'a str>, recovering: Option<&'a str>) -> Which<'a> {
        match (given, recovering) {
            (Some(id), _) => Which::Named(id),
            (None, Some(id)) => Which::Recovering(id),
            (None, None) => Which::Current,
        }
    }

    /// The system identifier to hand a prefetch worker.
    fn id(self) -> Option<&'a str> {
        match self {
            Which::Named(id) | Which::Recovering(id) => Some(id),
            Which::Current => None,
        }
    }

    fn pick(self, repo: &Repository, root: &RepositoryConfig) -> Result<Cluster> {
        match self {
            Which::Named(id) => repo.cluster(root, id),
            Which::Recovering(id) => repo.cluster(root, id).map_err(|_| {
                Error::conflict(format!(
                    "the data directory being recovered belongs to cluster {id} (its \
                     global/pg_control), and repository {} holds no WAL of that cluster: \
                     restore_command names the wrong --repo, or the cluster never archived there",
                    repo.url()
                ))
            }),
            Which::Current => Ok(repo.current(root)),
        }
    }

    /// The config of the chosen cluster in a repository whose walvault.json
    /// is `root`.
    fn config(self, root: &RepositoryConfig) -> Option<RepositoryConfig> {
        match self.id() {
            None => Some(root.current_cluster()),
            Some(id) => Repository::clusters_of(root)
                .into_iter()
                .find(|c| c.system_identifier == id),
        }
    }
}

/// The repository as the cluster being recovered sees it (its folder, in a
/// repository of several clusters), and that cluster's config (`None`: the
/// repository has no walvault.json yet). `root` is the repository's
/// walvault.json when it is already known.
pub(super) async fn open_cluster(
    url: &RepoUrl,
    root: Option<RepositoryConfig>,
    which: Which<'_>,
) -> Result<(Repository, Option<RepositoryConfig>)> {
    let repo = Repository::open(url, false)?;
    let root = match root {
        Some(root) => Some(root),
        None => repo.config().await?,
    };
    let Some(root) = root else {
        return Ok((repo, None));
    };
    let chosen = which.pick(&repo, &root)?;
    Ok((chosen.repo, Some(chosen.config)))
}

/// A fetch with no spool to remember the repository's config: the config
/// and the object where a repository of one cluster keeps it are asked for
/// at once, so that the common repository costs one round trip; after an
/// upgrade the object is then read from its cluster's folder.
async fn fetch_directly(
    url: &RepoUrl,
    which: Which<'_>,
    name: &WalFileName,
    path: &Path,
) -> Result<()> {
    let repo = Repository::open(url, false)?;
    let key = wal_key(name);
    let (root, at_root) = tokio::join!(repo.config(), repo.open_object(&key));
    let Some(root) = root? else {
        return deliver(&repo, name, path, at_root?, false).await;
    };
    let chosen = which.pick(&repo, &root)?;
    match chosen.namespace {
        None => deliver(&chosen.repo, name, path, at_root?, true).await,
        Some(_) => {
            drop(at_root);
            fetch_from_repository(&chosen.repo, name, path, true).await
        }
    }
}

/// Disk the prefetch spool may use by default.
pub const PREFETCH_BUDGET: u64 = 256 << 20;
pub(super) const PREFETCH_MAX: usize = 64;

/// The window: given, or what fits the budget (8 while the segment size is unknown).
fn window_len(given: Option<usize>, segment_size: Option<u32>) -> usize {
    given.unwrap_or_else(|| match segment_size {
        Some(s) => ((PREFETCH_BUDGET / u64::from(s.max(1))) as usize).clamp(1, PREFETCH_MAX),
        None => 8,
    })
}

/// How long a fetch waits for the background worker to finish downloading
/// a segment it has claimed before downloading the segment itself.
/// Also the most a prefetch worker spends downloading.
pub(super) const CLAIM_WAIT: Duration = Duration::from_secs(60);

/// Who runs this fetch, judged by the signal file in the working directory
/// (PostgreSQL runs restore_command in the data directory). It decides what a
/// failure must look like: PostgreSQL reads any exit of 1..=125 as "not in the
/// archive", which in archive recovery ends recovery there and opens the
/// server for writes without the rest of the WAL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Caller {
    /// standby.signal (it wins over recovery.signal, as in PostgreSQL): a
    /// failure makes the standby retry later or stream, so ordinary statuses.
    Standby,
    /// recovery.signal alone: a file that exists but cannot be delivered
    /// must stop recovery (exit above 125), and so must a gap in the archive.
    ArchiveRecovery,
    /// No signal file: a person or a script, ordinary statuses.
    Manual,
}

impl Caller {
    pub fn in_dir(dir: &Path) -> Caller {
        if dir.join("standby.signal").exists() {
            Caller::Standby
        } else if dir.join("recovery.signal").exists() {
            Caller::ArchiveRecovery
        } else {
            Caller::Manual
        }
    }

    /// The outcome to report for `name`: in archive recovery every failure
    /// but "not in the archive" stops recovery; elsewhere unchanged.
    pub fn report(self, name: &str, outcome: Result<()>) -> Result<()> {
        match outcome {
            Err(e)
                if self == Caller::ArchiveRecovery
                    && e.kind != crate::error::ErrorKind::NotFound
                    && !e.stops_recovery() =>
            {
                Err(e.stopping_recovery(&format!(
                    "archive recovery stopped on purpose, not ended, so that the server does \
                     not open without the WAL from {name} on: fix the cause named first (the \
                     repository, an object, or a full or unwritable local disk) and start the \
                     server again, or restore again with a recovery target before {name}"
                )))
            }
            other => other,
        }
    }
}

/// How long a fetch in archive recovery waits for a missing segment that
/// has later segments stored less than this long ago: a push-ahead worker
/// stores segments out of order for a moment.
const GAP_SETTLE: Duration = Duration::from_secs(30);

pub async fn run(url: &RepoUrl, opts: &FetchOptions) -> Result<()> {
    let caller = Caller::in_dir(Path::new("."));
    // A fetch ended by a signal leaves its temporary beside %p; nothing else
    // would ever remove it.
    let target_dir = match opts.path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    crate::sys::remove_abandoned_temporaries(target_dir);
    // A control file that is there but cannot be read leaves the cluster
    // unknown: guessing the current one could hand over another cluster's
    // segment, which PostgreSQL would take for the end of the archive.
    let recovering = match &opts.cluster {
        Some(_) => None,
        None => match crate::pg::cluster::system_identifier_beside(&opts.path) {
            Ok(id) => id,
            Err((control, e)) => {
                let e = Error::io(format!(
                    "cannot read {} to tell which cluster is recovering: {e}; nothing was \
                     written to {}",
                    control.display(),
                    opts.path.display()
                ));
                return caller.report(&opts.name, Err(e));
            }
        },
    };
    let which = Which::of(opts.cluster.as_deref(), recovering.as_deref());
    let mut outcome = fetch(url, opts, caller, which).await;
    if caller == Caller::ArchiveRecovery
        && let Err(e) = &outcome
        && e.kind == crate::error::ErrorKind::NotFound
        && let Ok(WalFileName::Segment(segment)) = WalFileName::parse(&opts.name)
        && !put_in_place(target_dir, &opts.name)
    {
        outcome = match open_cluster(url, None, which).await {
            Ok((repo, _)) => match gap_at(&repo, segment, GAP_SETTLE).await {
                Ok(Gap::Settled) => fetch(url, opts, caller, which).await,
                Ok(Gap::None) => outcome,
                Ok(Gap::Before(later)) => Err(gap_error(&repo, segment, later, target_dir).await),
                Err(e) => Err(e),
            },
            Err(e) => Err(e),
        };
    }
    caller.report(&opts.name, outcome)
}

/// Whether someone put a copy of the file named `name` (a validated WAL
/// file name) in `dir`, where `%p` goes (pg_wal): PostgreSQL looks there only
/// after restore_command answers "not in the archive", so a hole filled
/// there must get that answer.
fn put_in_place(dir: &Path, name: &str) -> bool {
    std::fs::metadata(dir.join(name)).is_ok_and(|m| m.is_file())
}

async fn fetch(url: &RepoUrl, opts: &FetchOptions, caller: Caller, which: Which<'_>) -> Result<()> {
    let name = WalFileName::parse(&opts.name).map_err(|e| Error::usage(e.to_string()))?;
    // Only recovery reads on to the following segments; a person, a script
    // or pg_rewind (--restore-target-wal, which leaves no signal file) asks
    // for the few it needs, and a worker would download a window for nothing.
    let recovering = caller != Caller::Manual;
    let ahead = match (name, Spool::locate(opts.spool.as_deref(), &opts.path)) {
        (WalFileName::Segment(segment), Some(spool)) if opts.prefetch != Some(0) && recovering => {
            Some((segment, spool))
        }
        _ => None,
    };
    let Some((segment, spool)) = ahead else {
        return fetch_directly(url, which, &name, &opts.path).await;
    };

    // Only this segment's successors on its timeline are worth keeping.
    let size = spool.segment_size();
    let depth = window_len(opts.prefetch, size);
    let window = size
        .map(|s| successors(segment, s, depth))
        .unwrap_or_default();
    spool.discard_prefetched(|n| {
        *n == name || matches!(n, WalFileName::Segment(s) if window.contains(s))
    });

    let spooled = wait_for_worker(url, &spool, &name, which).await;
    if hand_over(&spooled, &name, &opts.path) {
        tracing::debug!("restored {name} from the prefetch spool");
        // Refill once half the window is used up, in the background.
        if let Some(size) = size
            && (spooled.len() - 1) * 2 <= depth
        {
            start_worker(&spool, url, segment, depth, size, which.id());
        }
        return Ok(());
    }
    // A config remembered from the worker does not prove the repository is
    // still there: only one read now lets a missing object be the end of
    // the archive without a second look.
    let remembered = spool.remembered_config(url);
    let read_now = remembered.is_none();
    let (repo, config) = open_cluster(url, remembered, which).await?;
    fetch_from_repository(&repo, &name, &opts.path, read_now && config.is_some()).await?;
    let size = match (size, config) {
        (Some(s), _) => Some(s),
        (None, Some(config)) => {
            spool.remember_segment_size(config.wal_segment_size);
            Some(config.wal_segment_size)
        }
        (None, None) => None,
    };
    if let Some(size) = size {
        start_worker(
            &spool,
            url,
            segment,
            window_len(opts.prefetch, Some(size)),
            size,
            which.id(),
        );
    }
    Ok(())
}

/// If the background worker is downloading `name` from this repository
/// right now, waits for it rather than downloading the same object twice;
/// then the copies spooled for this repository (none if nothing spooled or
/// claimed is `name`: then there is no need to ask which repository this is).
async fn wait_for_worker(
    url: &RepoUrl,
    spool: &Spool,
    name: &WalFileName,
    which: Which<'_>,
) -> Vec<(WalFileName, Sha256Digest, PathBuf)> {
    if !spool.claimed_by_any(WorkerKind::Prefetch, name) && !spool.prefetched_by_any(name) {
        return vec![];
    }
    // Copies speak only for the repository they came from: the one at this
    // URL now must be it (see `RepoBinding`). The prefetch worker that made
    // them read its walvault.json moments ago; only when that is not on
    // record is the store asked.
    let root = match spool.remembered_config(url) {
        Some(c) => Some(c),
        None => match Repository::open(url, false) {
            Ok(repo) => repo.config().await.ok().flatten(),
            Err(_) => None,
        },
    };
    let Some(binding) = root
        .and_then(|root| which.config(&root))
        .map(|c| RepoBinding::of(url, &c))
    else {
        return vec![];
    };
    let since = Instant::now();
    let spooled = || spool.prefetched(&binding).iter().any(|(n, _, _)| n == name);
    while spool.claimed(WorkerKind::Prefetch, &binding, name)
        && spool.worker_running(WorkerKind::Prefetch)
        && since.elapsed() < CLAIM_WAIT
        && !spooled()
    {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    spool.prefetched(&binding)
}

fn start_worker(
    spool: &Spool,
    url: &RepoUrl,
    after: SegmentName,
    count: usize,
    size: u32,
    cluster: Option<&str>,
) {
    let mut args: Vec<std::ffi::OsString> = vec![
        "--count".into(),
        count.to_string().into(),
        "--segment-size".into(),
        size.to_string().into(),
    ];
    if let Some(id) = cluster {
        args.extend(["--cluster".into(), id.into()]);
    }
    args.push(WalFileName::Segment(after).to_string().into());
    crate::ahead::spawn_worker(spool, WorkerKind::Prefetch, url, &args);
}

#[cfg(test)]
mod tests {
    use super::gap::Later;
    use super::*;
    use crate::error::ErrorKind;
    use crate::format::key::wal_key;
    use crate::format::object;

    #[test]
    fn the_signal_file_in_the_working_directory_names_the_caller() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        assert_eq!(Caller::in_dir(d), Caller::Manual);
        std::fs::write(d.join("recovery.signal"), b"").unwrap();
        assert_eq!(Caller::in_dir(d), Caller::ArchiveRecovery);
        // Both: PostgreSQL runs a standby.
        std::fs::write(d.join("standby.signal"), b"").unwrap();
        assert_eq!(Caller::in_dir(d), Caller::Standby);
        std::fs::remove_file(d.join("recovery.signal")).unwrap();
        assert_eq!(Caller::in_dir(d), Caller::Standby);
    }

    #[test]
    fn only_archive_recovery_turns_failures_into_a_stop() {
        let name = "000000010000000000000005";
        let failures: [(fn() -> Error, u8); 4] = [
            (|| Error::corrupt("damaged"), 204),
            (|| Error::io("store down"), 205),
            (|| Error::usage("no repository"), 202),
            (|| Error::conflict("refused"), 203),
        ];
        // Errors are not Clone: compare what makes one.
        let seen = |e: &Error| (e.kind, e.message().to_string(), e.exit_code());
        for (make, status) in failures {
            let e = make();
            let kind = e.kind;
            let stopped = Caller::ArchiveRecovery
                .report(name, Err(make()))
                .unwrap_err();
            assert_eq!(stopped.exit_code(), status);
            assert!(stopped.message().starts_with(e.message()));
            assert!(stopped.message().contains("stopped on purpose"));
            assert!(!stopped.message().contains('\n'));
            // Reported again (main reports whatever fetch returns): unchanged.
            let stopped_seen = seen(&stopped);
            let again = Caller::ArchiveRecovery.report(name, Err(stopped));
            assert_eq!(again.map_err(|e| seen(&e)), Err(stopped_seen));
            for caller in [Caller::Standby, Caller::Manual] {
                let same = caller.report(name, Err(make())).unwrap_err();
                assert_eq!(same.exit_code(), kind.exit_code());
                assert_eq!(seen(&same), seen(&e));
            }
        }
        for caller in [Caller::ArchiveRecovery, Caller::Standby, Caller::Manual] {
            let missing = caller
                .report(name, Err(Error::not_found("not in the archive")))
                .unwrap_err();
            assert_eq!(missing.exit_code(), 1);
            assert_eq!(missing.kind, ErrorKind::NotFound);
            assert!(caller.report(name, Ok(())).is_ok());
        }
    }

    #[tokio::test]
    async fn an_object_of_a_newer_format_says_upgrade_not_damaged() {
        let dir = tempfile::tempdir().unwrap();
        let name = WalFileName::parse("000000010000000000000003").unwrap();
        let repo = repository_with(dir.path(), &[], Duration::ZERO);
        let object = dir.path().join(wal_key(&name).as_ref());
        std::fs::create_dir_all(object.parent().unwrap()).unwrap();
        let target = dir.path().join("RECOVERYXLOG");
        // The format version, then the compression code, from a newer walvault.
        for (offset, value) in [(12, 9u8), (14, 2u8)] {
            let (_, mut stored) = object::encode(b"a segment", 3).unwrap();
            stored[offset] = value;
            std::fs::write(&object, stored).unwrap();
            let e = fetch_from_repository(&repo, &name, &target, false)
                .await
                .unwrap_err();
            assert_eq!(e.kind, ErrorKind::Corrupt, "{e}");
            assert!(e.message().contains("written by a newer walvault"), "{e}");
            assert!(e.message().contains("upgrade walvault"), "{e}");
            assert!(!e.message().contains("damaged"), "{e}");
            assert!(!target.exists());
            let stopped = Caller::ArchiveRecovery
                .report(&name.to_string(), Err(e))
                .unwrap_err();
            assert_eq!(stopped.exit_code(), 204);
        }
    }

    fn segment(s: &str) -> SegmentName {
        match WalFileName::parse(s).unwrap() {
            WalFileName::Segment(s) => s,
            other => panic!("{other:?}"),
        }
    }

    /// A local repository holding objects (content does not matter here)
    /// under the keys of `names`, stored `age` ago.
    fn repository_with(dir: &Path, names: &[&str], age: Duration) -> Repository {
        for name in names {
            let key = wal_key(&WalFileName::parse(name).unwrap());
            let path = dir.join(key.as_ref());
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            let file = std::fs::File::create(&path).unwrap();
            file.set_modified(std::time::SystemTime::now() - age)
                .unwrap();
        }
        let url = RepoUrl::parse(dir.to_str().unwrap()).unwrap();
        Repository::open(&url, false).unwrap()
    }

    #[tokio::test]
    async fn a_missing_segment_between_stored_ones_is_a_gap() {
        let dir = tempfile::tempdir().unwrap();
        let hour = Duration::from_secs(3600);
        let repo = repository_with(
            dir.path(),
            &[
                "000000010000000000000003",
                "000000010000000000000004",
                "000000010000000000000006",
                // the next log folder, and another timeline
                "000000010000000100000000",
                "00000002000000000000000A",
                "000000010000000000000007.partial",
            ],
            hour,
        );
        let settle = Duration::from_secs(5);
        let gap = |s: &str| gap_at(&repo, segment(s), settle);
        assert_eq!(
            gap("000000010000000000000005").await.unwrap(),
            Gap::Before(Later::Segment(segment("000000010000000000000006")))
        );
        // Across log folders: the end of log 0 has nothing, log 1 has.
        assert_eq!(
            gap("0000000100000000000000FF").await.unwrap(),
            Gap::Before(Later::Segment(segment("000000010000000100000000")))
        );
        // The end of the archive: nothing of timeline 1 after it.
        assert_eq!(gap("000000010000000100000001").await.unwrap(), Gap::None);
        // Timeline 2 starts later: asking for an earlier segment of it is
        // what recovery does, not a gap.
        assert_eq!(gap("000000020000000000000005").await.unwrap(), Gap::None);
        // Before anything stored.
        assert_eq!(gap("000000010000000000000002").await.unwrap(), Gap::None);
    }

    /// walvault.json with 16 MiB segments, as push writes it.
    fn write_config(dir: &Path) {
        let config = crate::repository::RepositoryConfig {
            format: 1,
            system_identifier: "7".into(),
            pg_version: 15,
            wal_segment_size: 16 << 20,
            created_at: chrono::Utc::now(),
            upgrades: Vec::new(),
        };
        std::fs::write(
            dir.join("walvault.json"),
            serde_json::to_vec(&config).unwrap(),
        )
        .unwrap();
    }

    /// `TTTTTTTT.history` as PostgreSQL writes it, stored as push stores it.
    fn write_history(dir: &Path, timeline: u32, text: &str) {
        let key = wal_key(&WalFileName::TimelineHistory(timeline));
        let (_, stored) = object::encode(text.as_bytes(), 3).unwrap();
        std::fs::create_dir_all(dir.join(key.as_ref()).parent().unwrap()).unwrap();
        std::fs::write(dir.join(key.as_ref()), stored).unwrap();
    }

    /// A primary died with its archiver behind: timeline 1 is stored up to
    /// 05, 06 and 07 never were; the promoted standby archived `08.partial`
    /// of timeline 1 and timeline 2 from 08 on (it left timeline 1 in 08).
    /// `partial` and `history` choose which of that evidence is stored.
    fn failover(dir: &Path, partial: bool, history: bool) -> Repository {
        write_config(dir);
        if history {
            write_history(dir, 2, "1\t0/8000060\tno recovery target specified\n");
        }
        let mut names = vec![
            "000000010000000000000003",
            "000000010000000000000004",
            "000000010000000000000005",
            "000000020000000000000008",
            "000000020000000000000009",
        ];
        if partial {
            names.push("000000010000000000000008.partial");
        }
        repository_with(dir, &names, Duration::from_secs(3600))
    }

    #[tokio::test]
    async fn wal_that_a_promoted_standby_branched_from_later_makes_a_gap() {
        let settle = Duration::from_secs(5);
        // Recovery to latest asks for timeline 1's name below 08 (timeline
        // 2 begins in 08): ending recovery there would promote without any
        // of timeline 2.
        for (partial, history) in [(true, true), (true, false), (false, true)] {
            let dir = tempfile::tempdir().unwrap();
            let repo = failover(dir.path(), partial, history);
            let expected = if partial {
                Later::Partial(segment("000000010000000000000008"))
            } else {
                Later::Branch {
                    child: 2,
                    at: 0x8000060,
                }
            };
            for missing in ["000000010000000000000006", "000000010000000000000007"] {
                assert_eq!(
                    gap_at(&repo, segment(missing), settle).await.unwrap(),
                    Gap::Before(expected),
                    "{missing} with partial {partial}, history {history}"
                );
            }
            // Past timeline 1's end, and past the end of timeline 2: the
            // end of the archive.
            for end in ["00000001000000000000000A", "00000002000000000000000A"] {
                assert_eq!(
                    gap_at(&repo, segment(end), settle).await.unwrap(),
                    Gap::None
                );
            }
        }
        // The message names the evidence.
        let dir = tempfile::tempdir().unwrap();
        let repo = failover(dir.path(), false, true);
        let e = gap_error(
            &repo,
            segment("000000010000000000000006"),
            Later::Branch {
                child: 2,
                at: 0x8000060,
            },
            Path::new("pg_wal"),
        )
        .await;
        assert!(
            e.message()
                .contains("00000002.history says timeline 2 branched from it later, at 0/8000060"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn the_end_of_a_timeline_at_its_switch_segment_is_no_gap() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        write_config(d);
        write_history(d, 2, "1\t0/8000060\tno recovery target specified\n");
        // Timeline 1 complete up to 07; its 08 exists only as .partial
        // (timeline 2 took over inside 08).
        let repo = repository_with(
            d,
            &[
                "000000010000000000000006",
                "000000010000000000000007",
                "000000010000000000000008.partial",
                "000000020000000000000008",
                "000000020000000000000009",
            ],
            Duration::from_secs(3600),
        );
        let settle = Duration::from_secs(5);
        let gap = |s: &'static str| gap_at(&repo, segment(s), settle);
        // PostgreSQL asks for 08 by timeline 2's name first; asked by
        // timeline 1's (recovery along timeline 1), 08 is its end.
        assert_eq!(gap("000000010000000000000008").await.unwrap(), Gap::None);
        // Before timeline 2 began, and after its end.
        assert_eq!(gap("000000020000000000000007").await.unwrap(), Gap::None);
        assert_eq!(gap("00000002000000000000000A").await.unwrap(), Gap::None);
    }

    #[tokio::test]
    async fn a_missing_first_segment_of_a_timeline_is_a_gap_when_its_history_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        write_config(d);
        // Timeline 2 began in 08, but its 08 is missing.
        let repo = repository_with(
            d,
            &[
                "000000010000000000000007",
                "000000010000000000000008.partial",
                "000000020000000000000009",
                "00000002000000000000000A",
            ],
            Duration::from_secs(3600),
        );
        let settle = Duration::from_secs(5);
        let missing = segment("000000020000000000000008");
        // Without a history nothing says timeline 2 starts before 09.
        assert_eq!(gap_at(&repo, missing, settle).await.unwrap(), Gap::None);
        write_history(d, 2, "1\t0/8000060\tno recovery target specified\n");
        assert_eq!(
            gap_at(&repo, missing, settle).await.unwrap(),
            Gap::Before(Later::Segment(segment("000000020000000000000009")))
        );
        // Before the branch point it still starts later.
        assert_eq!(
            gap_at(&repo, segment("000000020000000000000007"), settle)
                .await
                .unwrap(),
            Gap::None
        );
    }

    #[tokio::test]
    async fn wal_that_prune_trimmed_on_purpose_is_no_gap() {
        let dir = tempfile::tempdir().unwrap();
        let hour = Duration::from_secs(3600);
        // An older backup's WAL (3), trimmed WAL (4-9), the window (10 on).
        let repo = repository_with(
            dir.path(),
            &[
                "000000010000000000000003",
                "00000001000000000000000A",
                "00000001000000000000000C",
            ],
            hour,
        );
        let settle = Duration::from_secs(5);
        let gap = |s: &'static str| gap_at(&repo, segment(s), settle);
        // Without a record of the trimming, a hole is a hole.
        assert_eq!(
            gap("000000010000000000000004").await.unwrap(),
            Gap::Before(Later::Segment(segment("00000001000000000000000A")))
        );
        let config = crate::repository::RepositoryConfig {
            format: 1,
            system_identifier: "7".into(),
            pg_version: 15,
            wal_segment_size: 1 << 20,
            created_at: chrono::Utc::now(),
            upgrades: Vec::new(),
        };
        std::fs::write(
            dir.path().join("walvault.json"),
            serde_json::to_vec(&config).unwrap(),
        )
        .unwrap();
        let retention = crate::repository::retention::Retention {
            complete_from_timeline: 1,
            complete_from_segno: 10,
            updated_at: chrono::Utc::now(),
            timelines: vec![],
        };
        crate::repository::retention::store(&repo, &retention)
            .await
            .unwrap();
        assert_eq!(gap("000000010000000000000004").await.unwrap(), Gap::None);
        // Inside the complete window it still is.
        assert_eq!(
            gap("00000001000000000000000B").await.unwrap(),
            Gap::Before(Later::Segment(segment("00000001000000000000000C")))
        );
    }

    #[tokio::test]
    async fn a_gap_next_to_fresh_segments_waits_for_them_to_settle() {
        let dir = tempfile::tempdir().unwrap();
        let repo = repository_with(
            dir.path(),
            &["000000010000000000000003", "000000010000000000000005"],
            Duration::ZERO,
        );
        let late = dir
            .path()
            .join(wal_key(&WalFileName::Segment(segment("000000010000000000000004"))).as_ref());
        let writer = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(700)).await;
            std::fs::write(late, b"x").unwrap();
        });
        let since = Instant::now();
        let gap = gap_at(
            &repo,
            segment("000000010000000000000004"),
            Duration::from_secs(20),
        )
        .await
        .unwrap();
        writer.await.unwrap();
        assert_eq!(gap, Gap::Settled);
        assert!(since.elapsed() < Duration::from_secs(10));
        // Fresh later segments and nothing arriving: a gap once settled.
        let since = Instant::now();
        let gap = gap_at(
            &repo,
            segment("000000010000000000000002"),
            Duration::from_secs(1),
        )
        .await
        .unwrap();
        assert_eq!(gap, Gap::None);
        let repo = repository_with(dir.path(), &["000000010000000000000007"], Duration::ZERO);
        let gap = gap_at(
            &repo,
            segment("000000010000000000000006"),
            Duration::from_secs(1),
        )
        .await
        .unwrap();
        assert_eq!(
            gap,
            Gap::Before(Later::Segment(segment("000000010000000000000007")))
        );
        assert!(since.elapsed() >= Duration::from_secs(1));
    }
}
