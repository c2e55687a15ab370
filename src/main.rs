//! Command-line parsing only: every verb lives in `walvault::commands`.

use clap::{Parser, Subcommand};
use std::process::ExitCode;
use walvault::commands::{
    backup, check, drill, fetch, list, prune, push, restore, status, upgrade, verify,
};
use walvault::error::{Error, ErrorKind};
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
    Push(push::PushOptions),
    /// Restore one WAL file (restore_command = 'walvault fetch %f %p').
    Fetch(fetch::FetchOptions),
    /// Internal: the background worker push starts to push ready segments ahead.
    #[command(hide = true)]
    PushAhead(push::AheadOptions),
    /// Internal: the background worker fetch starts to download segments ahead.
    #[command(hide = true)]
    FetchAhead(fetch::AheadOptions),
    /// Take an online base backup of a running server.
    Backup(backup::BackupOptions),
    /// Prove archiving works end to end and name what would make archiving or a restore fail.
    Check(check::CheckOptions),
    /// List backups, newest last.
    List(list::ListOptions),
    /// Rebuild a data directory from a backup, set up to recover from the archive.
    Restore(restore::RestoreOptions),
    /// Delete backups and WAL outside the retention policy (for cron).
    Prune(prune::PruneOptions),
    /// Prove a restore: restore into a scratch dir, start PostgreSQL, recover, query, clean up.
    Drill(drill::DrillOptions),
    /// What the repository holds and can recover.
    Status(status::StatusOptions),
    /// Read every object back, check checksums and WAL continuity.
    Verify(verify::VerifyOptions),
    /// Bind the repository to a new cluster after pg_upgrade or a dump and restore.
    Upgrade(upgrade::UpgradeOptions),
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

/// What walvault says about a command line clap refuses: one line, as
/// everything walvault says lands in PostgreSQL's log. A value one of
/// walvault's own parsers refused (a duration, a time, an LSN, ...) is told
/// in that parser's words alone.
fn command_line_error(e: &clap::Error) -> Error {
    if e.kind() == clap::error::ErrorKind::ValueValidation
        && let Some(ours) = std::error::Error::source(e).and_then(|s| s.downcast_ref::<Error>())
    {
        return Error::new(ours.kind, ours.message());
    }
    let rendered = e.to_string();
    let what: Vec<&str> = rendered
        .lines()
        .take_while(|l| !l.starts_with("Usage:"))
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("tip:"))
        .collect();
    let what = what.join(" ");
    Error::usage(format!(
        "{} (see 'walvault --help')",
        what.trim_start_matches("error: ")
    ))
}

fn main() -> ExitCode {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let recovery_fetch = recovery_fetch(&args, std::path::Path::new("."));
    install_panic_hook(recovery_fetch.clone());
    let cli = match Cli::try_parse_from(&args) {
        Ok(cli) => cli,
        Err(e) if e.use_stderr() => {
            let e = command_line_error(&e);
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
        Command::Fetch(_) | Command::FetchAhead(_) | Command::Restore(_) | Command::Drill(_)
    ) && let Ok(url) = RepoUrl::parse(cli.repo.as_deref().unwrap_or(""))
    {
        walvault::repository::restrict_created_modes(&url);
    }
    // push and fetch run once per WAL file: a single-threaded runtime starts
    // faster, and their CPU work runs on blocking threads anyway.
    let mut runtime = match cli.command {
        Command::Push(_) | Command::Fetch(_) | Command::PushAhead(_) | Command::FetchAhead(_) => {
            tokio::runtime::Builder::new_current_thread()
        }
        _ => tokio::runtime::Builder::new_multi_thread(),
    };
    // Only fetch answers "not in the archive" quietly: PostgreSQL asks for
    // files that do not exist yet. Every other command says what it missed.
    let quiet_not_found = matches!(cli.command, Command::Fetch(_));
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
        Command::Push(opts) => push::run(&url, &opts).await,
        Command::Fetch(opts) => fetch::run(&url, &opts).await,
        Command::PushAhead(opts) => push::run_ahead(&url, &opts).await,
        Command::FetchAhead(opts) => fetch::run_ahead(&url, &opts).await,
        Command::Backup(opts) => backup::run(&url, &opts).await,
        Command::Check(opts) => check::run(&url, &opts).await,
        Command::List(opts) => list::run(&url, &opts).await,
        Command::Restore(opts) => restore::run(&url, &opts).await,
        Command::Prune(opts) => {
            let opts = prune::PruneOptions {
                quiet: cli.quiet,
                ..opts
            };
            prune::run(&url, &opts).await
        }
        Command::Drill(opts) => drill::run(&url, &opts).await,
        Command::Status(opts) => status::run(&url, &opts).await,
        Command::Verify(opts) => verify::run(&url, &opts).await,
        Command::Upgrade(opts) => upgrade::run(&url, &opts).await,
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
    fn the_command_line_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn a_value_walvault_refuses_is_told_in_its_own_words() {
        let e = Cli::try_parse_from(["walvault", "status", "--max-age", "7x"])
            .err()
            .unwrap();
        let e = command_line_error(&e);
        let want = walvault::human::parse_duration("7x").unwrap_err();
        assert_eq!(e.message(), want.message());
        assert_eq!(e.exit_code(), 2);
        let e = Cli::try_parse_from(["walvault", "status", "--bogus"])
            .err()
            .unwrap();
        let e = command_line_error(&e);
        assert_eq!(
            e.message(),
            "unexpected argument '--bogus' found (see 'walvault --help')"
        );
        assert_eq!(e.exit_code(), 2);
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
