//! Command-line parsing only: every verb lives in `walvault::commands`.

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use walvault::commands::restore::{RecoveryTarget, parse_time};
use walvault::commands::{backup, check, drill, fetch, list, prune, push, restore, status, verify};
use walvault::error::{Error, ErrorKind};
use walvault::human::parse_duration;
use walvault::repository::RepoUrl;

#[derive(Parser)]
#[command(
    name = "walvault",
    version,
    about = "PostgreSQL WAL archive and point-in-time recovery, on a filesystem or S3",
    after_help = "postgresql.conf:\n  archive_command = 'walvault --repo URL push %p %f'\n  restore_command = 'walvault --repo URL fetch %f %p'"
)]
struct Cli {
    /// Repository: /abs/path, file:///abs/path or s3://bucket/prefix (S3 settings from AWS_* variables).
    #[arg(
        long,
        global = true,
        env = "WALVAULT_REPO",
        value_name = "URL",
        hide_env_values = false
    )]
    repo: Option<String>,

    /// More log output (-v debug, -vv trace; or WALVAULT_VERBOSE=1|2).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,

    /// Only warnings and errors.
    #[arg(short, long, global = true, env = "WALVAULT_QUIET")]
    quiet: bool,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Archive one WAL file (archive_command = 'walvault push %p %f').
    Push {
        /// %p: path of the file, relative to the data directory.
        path: PathBuf,
        /// %f: its file name.
        name: String,
        /// zstd level (1-19).
        #[arg(long, env = "WALVAULT_COMPRESS_LEVEL", default_value_t = 3,
              value_parser = clap::value_parser!(i32).range(1..=19))]
        compress_level: i32,
        /// Push up to N other segments PostgreSQL has marked ready ahead of its calls, in a background worker (0: off).
        #[arg(long, env = "WALVAULT_PUSH_AHEAD", default_value_t = 16)]
        push_ahead: usize,
        /// Scratch directory for work done ahead (default: pg_wal/walvault-spool).
        #[arg(long, env = "WALVAULT_SPOOL")]
        spool: Option<PathBuf>,
    },
    /// Restore one WAL file (restore_command = 'walvault fetch %f %p').
    Fetch {
        /// %f: the file name PostgreSQL asks for.
        name: String,
        /// %p: where to write it, relative to the data directory.
        path: PathBuf,
        /// Download up to K following segments in parallel ahead of recovery (0: off;
        /// default: as many as fit in 256 MiB, at most 64).
        #[arg(long, env = "WALVAULT_PREFETCH")]
        prefetch: Option<usize>,
        /// Scratch directory for work done ahead (default: pg_wal/walvault-spool).
        #[arg(long, env = "WALVAULT_SPOOL")]
        spool: Option<PathBuf>,
    },
    /// Internal: the background worker push starts to push ready segments ahead.
    #[command(hide = true)]
    PushAhead {
        /// pg_wal of the cluster.
        wal_dir: PathBuf,
        #[arg(long)]
        spool: PathBuf,
        #[arg(long)]
        push_ahead: usize,
        #[arg(long, value_parser = clap::value_parser!(i32).range(1..=19))]
        compress_level: i32,
        /// A segment not to push (its own push just did).
        #[arg(long)]
        skip: Option<String>,
    },
    /// Internal: the background worker fetch starts to download segments ahead.
    #[command(hide = true)]
    FetchAhead {
        /// The segment recovery has just been given; the ones after it are fetched.
        after: String,
        #[arg(long)]
        spool: PathBuf,
        #[arg(long)]
        count: usize,
        #[arg(long)]
        segment_size: u32,
    },
    /// Take an online base backup of a running server.
    Backup {
        /// Data directory (default: asked from the server).
        #[arg(long, env = "PGDATA")]
        pgdata: Option<PathBuf>,
        /// Connection string or URL (default: PGHOST, PGPORT, PGUSER, PGDATABASE, PGPASSWORD).
        #[arg(long, env = "WALVAULT_DBNAME", hide_env_values = true)]
        dbname: Option<String>,
        /// Files copied in parallel (default: the number of cores).
        #[arg(long, env = "WALVAULT_JOBS")]
        jobs: Option<usize>,
        /// zstd level (1-19).
        #[arg(long, env = "WALVAULT_COMPRESS_LEVEL", default_value_t = 3,
              value_parser = clap::value_parser!(i32).range(1..=19))]
        compress_level: i32,
        /// Seconds to wait for the backup's last WAL to be archived.
        #[arg(long, env = "WALVAULT_ARCHIVE_TIMEOUT", default_value_t = 300)]
        archive_timeout: u64,
    },
    /// Prove archiving works end to end and name what would make archiving or a restore fail.
    Check {
        /// Connection string or URL (default: PGHOST, PGPORT, PGUSER, PGDATABASE, PGPASSWORD).
        #[arg(long, env = "WALVAULT_DBNAME", hide_env_values = true)]
        dbname: Option<String>,
        /// Seconds to wait for the switched segment to reach the repository.
        #[arg(long, default_value_t = 60)]
        timeout: u64,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// List backups, newest last.
    List {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Rebuild a data directory from a backup, set up to recover from the archive.
    Restore(RestoreArgs),
    /// Delete backups and WAL outside the retention policy (for cron).
    Prune {
        /// Keep the newest N backups.
        #[arg(long, env = "WALVAULT_KEEP_LAST")]
        keep_last: Option<usize>,
        /// Keep backups newer than this (e.g. 7d, 36h).
        #[arg(long, env = "WALVAULT_KEEP_WITHIN")]
        keep_within: Option<String>,
        /// Keep point-in-time recovery this far back; older kept backups keep only the WAL that makes them consistent.
        #[arg(long, env = "WALVAULT_KEEP_WAL_WITHIN")]
        keep_wal_within: Option<String>,
        /// Print what would be deleted, change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Prove a restore: restore into a scratch dir, start PostgreSQL, recover, query, clean up.
    Drill(DrillArgs),
    /// What the repository holds and can recover.
    Status {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        /// Exit 6 when the newest archived WAL is older than this (e.g. 15m).
        #[arg(long, env = "WALVAULT_MAX_AGE")]
        max_age: Option<String>,
        /// Draw the timeline picture even when not on a terminal.
        #[arg(long)]
        graph: bool,
    },
    /// Read every object back, check checksums and WAL continuity.
    Verify {
        /// Only this backup (its content and the WAL it needs).
        #[arg(long)]
        backup: Option<String>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        /// Objects read in parallel (default: four per core).
        #[arg(long, env = "WALVAULT_JOBS")]
        jobs: Option<usize>,
    },
}

/// Which backup, and where recovery stops (default: the end of the archive).
#[derive(clap::Args)]
#[group(skip)]
struct TargetArgs {
    /// Backup id, or "latest" (default: the newest that can reach the target).
    #[arg(long, env = "WALVAULT_BACKUP")]
    backup: Option<String>,
    /// Recover to this time: RFC 3339 or 'YYYY-MM-DD HH:MM:SS+ZZ' (a zone is required).
    #[arg(long, group = "target")]
    time: Option<String>,
    /// Recover to this LSN (e.g. 0/3000060).
    #[arg(long, group = "target")]
    lsn: Option<String>,
    /// Recover to this transaction id.
    #[arg(long, group = "target")]
    xid: Option<String>,
    /// Recover to this restore point (pg_create_restore_point).
    #[arg(long, group = "target")]
    name: Option<String>,
    /// Stop as soon as the backup is consistent.
    #[arg(long, group = "target")]
    immediate: bool,
}

impl TargetArgs {
    fn recovery_target(&self) -> Result<RecoveryTarget, Error> {
        Ok(if let Some(t) = &self.time {
            RecoveryTarget::Time(parse_time(t)?)
        } else if let Some(l) = &self.lsn {
            RecoveryTarget::Lsn(l.parse()?)
        } else if let Some(x) = &self.xid {
            RecoveryTarget::Xid(x.clone())
        } else if let Some(n) = &self.name {
            RecoveryTarget::Name(n.clone())
        } else if self.immediate {
            RecoveryTarget::Immediate
        } else {
            RecoveryTarget::Latest
        })
    }
}

#[derive(clap::Args)]
struct DrillArgs {
    #[command(flatten)]
    target: TargetArgs,
    /// PostgreSQL server binaries (default: pg_config --bindir, else PATH).
    #[arg(long, env = "WALVAULT_PG_BIN")]
    pg_bin: Option<PathBuf>,
    /// A query that must succeed on the recovered server; its first value is reported.
    #[arg(long)]
    check_sql: Option<String>,
    /// Machine-readable report.
    #[arg(long)]
    json: bool,
    /// Where to create the scratch directory (default: the temp dir).
    #[arg(long)]
    scratch: Option<PathBuf>,
    /// Seconds allowed for the server to start and recover.
    #[arg(long, default_value_t = 600)]
    timeout: u64,
    /// Files restored in parallel (default: twice the number of cores).
    #[arg(long, env = "WALVAULT_JOBS")]
    jobs: Option<usize>,
}

#[derive(clap::Args)]
struct RestoreArgs {
    /// Directory to restore into: new or empty.
    #[arg(long, env = "PGDATA")]
    pgdata: PathBuf,
    #[command(flatten)]
    target: TargetArgs,
    /// What the server does at the target: promote (default), pause or shutdown.
    #[arg(long)]
    target_action: Option<String>,
    /// Set up a streaming standby (standby.signal) instead of a recovery.
    #[arg(long)]
    standby: bool,
    /// The primary's connection string for a standby.
    #[arg(long, requires = "standby")]
    primary_conninfo: Option<String>,
    /// Files restored in parallel (default: twice the number of cores).
    #[arg(long, env = "WALVAULT_JOBS")]
    jobs: Option<usize>,
    /// OID=DIR: restore a tablespace into DIR instead of its original location.
    #[arg(long, value_name = "OID=DIR")]
    tablespace_map: Vec<String>,
    /// Timeline to recover along: latest (default), current (the backup's) or a number.
    #[arg(long, value_name = "latest|current|N")]
    target_timeline: Option<String>,
    /// Stop just before the --time, --lsn or --xid target instead of just after it.
    #[arg(long)]
    target_exclusive: bool,
    /// KEY=VALUE: another setting for postgresql.auto.conf (repeatable; wins over walvault's).
    #[arg(long, value_name = "KEY=VALUE")]
    recovery_option: Vec<String>,
    /// Whether the restored server keeps archiving into the repository: preserve (default) or off.
    #[arg(long, value_name = "preserve|off")]
    archive_mode: Option<String>,
}

fn cores() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
}

impl RestoreArgs {
    fn into_options(self) -> Result<restore::RestoreOptions, Error> {
        let target = self.target.recovery_target()?;
        let mut tablespace_map = vec![];
        for m in &self.tablespace_map {
            let parsed = m
                .split_once('=')
                .and_then(|(oid, dir)| Some((oid.parse().ok()?, PathBuf::from(dir))));
            tablespace_map.push(
                parsed.ok_or_else(|| {
                    Error::usage(format!("--tablespace-map '{m}' is not OID=DIR"))
                })?,
            );
        }
        Ok(restore::RestoreOptions {
            pgdata: self.pgdata,
            backup: self.target.backup,
            target,
            target_action: self.target_action,
            standby: self.standby,
            primary_conninfo: self.primary_conninfo,
            jobs: self.jobs.unwrap_or(2 * cores()),
            tablespace_map,
            target_timeline: match &self.target_timeline {
                Some(t) => restore::TargetTimeline::parse(t)?,
                None => restore::TargetTimeline::Latest,
            },
            target_exclusive: self.target_exclusive,
            recovery_options: self
                .recovery_option
                .iter()
                .map(|o| restore::parse_recovery_option(o))
                .collect::<Result<_, _>>()?,
            archive_mode: match &self.archive_mode {
                Some(m) => restore::ArchiveMode::parse(m)?,
                None => restore::ArchiveMode::Preserve,
            },
            tablespaces_under: None,
        })
    }
}

/// When this is `walvault fetch` run by archive recovery (see
/// [`fetch::Caller`]), the file asked for (as far as the arguments tell):
/// then every failure, even one before fetch runs (a bad option, no
/// repository, a panic), must stop recovery rather than end it.
fn recovery_fetch(args: &[std::ffi::OsString], dir: &std::path::Path) -> Option<String> {
    let mut words = args.iter().skip(1).map(|a| a.to_string_lossy());
    // The subcommand is the first word that is neither an option nor the
    // value of --repo (the only global option that takes one).
    let command = loop {
        let word = words.next()?;
        if word == "--repo" {
            words.next();
        } else if !word.starts_with('-') {
            break word;
        }
    };
    if command != "fetch" || fetch::Caller::in_dir(dir) != fetch::Caller::ArchiveRecovery {
        return None;
    }
    Some(
        words
            .find(|w| walvault::pg::wal::WalFileName::parse(w).is_ok())
            .map_or_else(|| "the file asked for".to_string(), |w| w.into_owned()),
    )
}

/// The one line a panic prints instead of Rust's several: a panic is a bug,
/// and what walvault says lands in PostgreSQL's log line by line.
fn internal_error_line(what: &str, location: Option<String>) -> String {
    let at = location.map(|l| format!(" at {l}")).unwrap_or_default();
    format!(
        "internal error, a bug in walvault: {}{at}; please report it",
        what.replace(['\n', '\r'], " ")
    )
}

/// Panics print one line. In a fetch run by archive recovery a panic exits
/// at once with [`walvault::error::STOPS_RECOVERY`]: Rust's 101 would read as
/// "not in the archive" and end recovery without the rest of the WAL.
fn install_panic_hook(recovery_fetch: Option<String>) {
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let what = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "panic".to_string());
        let line = internal_error_line(
            &what,
            info.location()
                .map(|l| format!("{}:{}", l.file(), l.line())),
        );
        match &recovery_fetch {
            Some(name) => {
                let e = fetch::Caller::ArchiveRecovery
                    .report(name, Err(Error::io(line)))
                    .unwrap_err();
                eprintln!("walvault: error: {e}");
                std::process::exit(i32::from(walvault::error::STOPS_RECOVERY));
            }
            None => eprintln!("walvault: error: {line}"),
        }
    }));
}

fn main() -> ExitCode {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let recovery_fetch = recovery_fetch(&args, std::path::Path::new("."));
    install_panic_hook(recovery_fetch.clone());
    let cli = match Cli::try_parse_from(&args) {
        Ok(cli) => cli,
        Err(e) if e.use_stderr() => {
            // One line, as everything walvault says lands in PostgreSQL's log.
            let rendered = e.to_string();
            let what: Vec<&str> = rendered
                .lines()
                .take_while(|l| !l.starts_with("Usage:"))
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with("tip:"))
                .collect();
            let what = what.join(" ");
            let e = Error::usage(format!(
                "{} (see 'walvault --help')",
                what.trim_start_matches("error: ")
            ));
            let e = match &recovery_fetch {
                Some(name) => fetch::Caller::ArchiveRecovery
                    .report(name, Err(e))
                    .unwrap_err(),
                None => e,
            };
            eprintln!("walvault: error: {e}");
            return ExitCode::from(e.exit_code());
        }
        Err(e) => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
    };
    // WALVAULT_VERBOSE=1 (or 2) where adding -v to archive_command is awkward.
    let env_verbose: u8 = std::env::var("WALVAULT_VERBOSE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    walvault::logging::init(if cli.quiet {
        -1
    } else {
        cli.verbose.max(env_verbose).min(100) as i8
    });
    // Repository files hold the whole database: their modes must not follow
    // the caller's umask. Commands that write a data directory or pg_wal
    // keep it, and set PostgreSQL's modes themselves.
    if !matches!(
        cli.command,
        Command::Fetch { .. }
            | Command::FetchAhead { .. }
            | Command::Restore(_)
            | Command::Drill(_)
    ) && let Ok(url) = RepoUrl::parse(cli.repo.as_deref().unwrap_or(""))
    {
        walvault::repository::restrict_created_modes(&url);
    }
    // push and fetch run once per WAL file: a single-threaded runtime starts
    // faster, and their CPU work runs on blocking threads anyway.
    let mut runtime = match cli.command {
        Command::Push { .. }
        | Command::Fetch { .. }
        | Command::PushAhead { .. }
        | Command::FetchAhead { .. } => tokio::runtime::Builder::new_current_thread(),
        _ => tokio::runtime::Builder::new_multi_thread(),
    };
    // Only fetch answers "not in the archive" quietly: PostgreSQL asks for
    // files that do not exist yet. Every other command says what it missed.
    let quiet_not_found = matches!(cli.command, Command::Fetch { .. });
    let result = runtime
        .enable_all()
        .build()
        .map_err(|e| Error::io(format!("cannot start the async runtime: {e}")))
        .and_then(|rt| rt.block_on(run(cli)));
    // Failures before fetch ran (no repository, a bad URL) too.
    let result = match &recovery_fetch {
        Some(name) => fetch::Caller::ArchiveRecovery.report(name, result),
        None => result,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if quiet_not_found && e.kind == ErrorKind::NotFound && !e.stops_recovery() {
                // PostgreSQL asks for files that do not exist yet: not an error.
                tracing::debug!("{e}");
            } else {
                tracing::error!("{e}");
            }
            ExitCode::from(e.exit_code())
        }
    }
}

async fn run(cli: Cli) -> Result<(), Error> {
    let url = RepoUrl::parse(cli.repo.as_deref().unwrap_or(""))?;
    match cli.command {
        Command::Push {
            path,
            name,
            compress_level,
            push_ahead,
            spool,
        } => {
            let opts = push::PushOptions {
                path,
                name,
                compress_level,
                push_ahead,
                spool,
            };
            push::run(&url, &opts).await
        }
        Command::Fetch {
            name,
            path,
            prefetch,
            spool,
        } => {
            let opts = fetch::FetchOptions {
                name,
                path,
                prefetch,
                spool,
            };
            fetch::run(&url, &opts).await
        }
        Command::PushAhead {
            wal_dir,
            spool,
            push_ahead,
            compress_level,
            skip,
        } => {
            let opts = push::AheadOptions {
                wal_dir,
                spool,
                push_ahead,
                compress_level,
                skip,
            };
            push::run_ahead(&url, &opts).await
        }
        Command::FetchAhead {
            after,
            spool,
            count,
            segment_size,
        } => {
            let opts = fetch::AheadOptions {
                after,
                spool,
                count,
                segment_size,
            };
            fetch::run_ahead(&url, &opts).await
        }
        Command::Backup {
            pgdata,
            dbname,
            jobs,
            compress_level,
            archive_timeout,
        } => {
            let opts = backup::BackupOptions {
                pgdata,
                dbname,
                jobs: jobs.unwrap_or_else(cores),
                compress_level,
                archive_timeout: std::time::Duration::from_secs(archive_timeout),
            };
            backup::run(&url, &opts).await
        }
        Command::List { json } => list::run(&url, json).await,
        Command::Check {
            dbname,
            timeout,
            json,
        } => {
            let opts = check::CheckOptions {
                dbname,
                timeout: std::time::Duration::from_secs(timeout),
                json,
            };
            check::run(&url, &opts).await
        }
        Command::Drill(a) => {
            let opts = drill::DrillOptions {
                target: a.target.recovery_target()?,
                backup: a.target.backup,
                pg_bin: a.pg_bin,
                check_sql: a.check_sql,
                json: a.json,
                scratch_parent: a.scratch,
                timeout: std::time::Duration::from_secs(a.timeout),
                jobs: a.jobs.unwrap_or(2 * cores()),
            };
            drill::run(&url, &opts).await
        }
        Command::Status {
            json,
            max_age,
            graph,
        } => {
            let max_age = max_age.map(|d| parse_duration(&d)).transpose()?;
            status::run(
                &url,
                &status::StatusOptions {
                    json,
                    max_age,
                    graph,
                },
            )
            .await
        }
        Command::Verify { backup, json, jobs } => {
            let jobs = jobs.unwrap_or(4 * cores());
            verify::run(&url, &verify::VerifyOptions { backup, json, jobs }).await
        }
        Command::Prune {
            keep_last,
            keep_within,
            keep_wal_within,
            dry_run,
        } => {
            let duration = |d: Option<String>| d.map(|d| parse_duration(&d)).transpose();
            let policy = prune::Policy {
                keep_last,
                keep_within: duration(keep_within)?,
                keep_wal_within: duration(keep_wal_within)?,
            };
            prune::run(
                &url,
                &prune::PruneOptions {
                    policy,
                    dry_run,
                    quiet: cli.quiet,
                },
            )
            .await
        }
        Command::Restore(args) => restore::run(&url, &args.into_options()?).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(words: &[&str]) -> Vec<std::ffi::OsString> {
        words.iter().map(Into::into).collect()
    }

    #[test]
    fn a_fetch_is_told_from_its_arguments_and_the_signal_file() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let name = "000000010000000000000005";
        let fetch = args(&[
            "walvault",
            "--repo",
            "fetch",
            "fetch",
            name,
            "pg_wal/RECOVERYXLOG",
        ]);
        assert_eq!(recovery_fetch(&fetch, d), None);
        std::fs::write(d.join("recovery.signal"), b"").unwrap();
        assert_eq!(recovery_fetch(&fetch, d).as_deref(), Some(name));
        for words in [
            &[
                "walvault",
                "-v",
                "--repo=/r",
                "fetch",
                "--prefetch",
                "0",
                name,
                "x",
            ][..],
            &["walvault", "fetch", "--bogus", name, "x"],
        ] {
            assert_eq!(recovery_fetch(&args(words), d).as_deref(), Some(name));
        }
        assert_eq!(
            recovery_fetch(&args(&["walvault", "fetch"]), d).as_deref(),
            Some("the file asked for")
        );
        for words in [
            &["walvault", "--repo", "fetch", "push", name, "x"][..],
            &["walvault", "status"],
            &["walvault"],
        ] {
            assert_eq!(recovery_fetch(&args(words), d), None);
        }
        std::fs::write(d.join("standby.signal"), b"").unwrap();
        assert_eq!(recovery_fetch(&fetch, d), None);
    }

    #[test]
    fn a_panic_is_one_line() {
        let line = internal_error_line("index out of\nbounds", Some("src/x.rs:3".into()));
        assert_eq!(
            line,
            "internal error, a bug in walvault: index out of bounds at src/x.rs:3; please report it"
        );
    }
}
