//! `walvault drill`: prove a restore end to end. Restore a backup into a
//! scratch directory, start PostgreSQL on it, let it recover, query it, report,
//! stop it and clean up.

use crate::commands::restore::target::conf_quote;
use crate::commands::restore::{self, RecoveryTarget, RestoreOptions};
use crate::error::{Context, Error, Result};
use crate::pg::lsn::{format_lsn, parse_lsn};
use crate::pg::server::{
    Scratch, append_to_file, chown_to_postgres, create_new_file, effective_user_name, find_bindir,
    hba_text, ident_text, is_root, make_private_dir, server_command,
};
use crate::pg::wal::SegmentName;
use crate::repository::archive::WalArchive;
use crate::repository::{RepoUrl, Repository};
use clap::builder::TypedValueParser as _;
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

// The doc comments are `walvault drill --help`.
#[derive(clap::Args)]
pub struct DrillOptions {
    /// Backup id, or "latest" (default: the newest that can reach the target).
    #[arg(long, env = "WALVAULT_BACKUP")]
    pub backup: Option<String>,
    #[command(flatten)]
    pub target: RecoveryTarget,
    /// PostgreSQL server binaries (default: pg_config --bindir, else PATH).
    #[arg(long, env = "WALVAULT_PG_BIN")]
    pub pg_bin: Option<PathBuf>,
    /// A query that must succeed on the recovered server; its first value is reported.
    #[arg(long)]
    pub check_sql: Option<String>,
    /// Machine-readable report.
    #[arg(long)]
    pub json: bool,
    /// Where to create the scratch directory (default: the temp dir).
    #[arg(long = "scratch", value_name = "SCRATCH")]
    pub scratch_parent: Option<PathBuf>,
    /// Seconds allowed for the server to start and recover.
    #[arg(long, default_value = "600",
          value_parser = clap::value_parser!(u64).map(Duration::from_secs))]
    pub timeout: Duration,
    /// Files restored in parallel (default: twice the number of cores).
    #[arg(long, env = "WALVAULT_JOBS")]
    pub jobs: Option<usize>,
}

#[derive(Serialize, Default)]
struct Report {
    ok: bool,
    backup: String,
    restore_seconds: f64,
    ready_seconds: f64,
    replayed_lsn: Option<String>,
    replayed_segment: Option<String>,
    last_replayed_commit: Option<String>,
    newest_archived_segment: Option<String>,
    segments_behind_archive: Option<u64>,
    check_sql_result: Option<String>,
    error: Option<String>,
    server_log_tail: Option<String>,
}

/// The server log's tail once it says why recovery stopped, if it does
/// within a few seconds: a connection can fail while the server is still
/// writing its last lines.
async fn stopped_server_log(scratch: &Scratch) -> String {
    let mut tail = scratch.log_tail();
    for _ in 0..30 {
        if recovery_stop_reason(&tail).is_some() || tail.contains("database system is shut down") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        tail = scratch.log_tail();
    }
    tail
}

/// Why the restored server stopped during recovery, when walvault's fetch
/// stopped it: fetch exits 200 + its status for a WAL file that exists but
/// cannot be delivered (damaged, a gap, the store unreachable), and says why
/// in one line, which lands in the server's log. The drill fails with that
/// line and fetch's own status.
fn recovery_stop_reason(log_tail: &str) -> Option<Error> {
    let line = log_tail
        .lines()
        .rev()
        .find_map(|l| l.split_once("walvault: error:").map(|(_, why)| why.trim()))?;
    // PostgreSQL's own line: 'could not restore file "…" from archive: child
    // process exited with exit code 204'.
    let status = log_tail.lines().rev().find_map(|l| {
        if !l.contains("could not restore file") {
            return None;
        }
        let (_, after) = l.split_once("exit code ")?;
        after
            .split(|c: char| !c.is_ascii_digit())
            .next()?
            .parse::<u16>()
            .ok()
    });
    let kind = match status.map(|s| s.saturating_sub(200)) {
        Some(2) => crate::error::ErrorKind::Usage,
        Some(3) => crate::error::ErrorKind::Conflict,
        Some(4) => crate::error::ErrorKind::Corrupt,
        _ => crate::error::ErrorKind::Io,
    };
    Some(Error::new(
        kind,
        format!("recovery stopped before the end of the archive: {line}"),
    ))
}

pub async fn run(url: &RepoUrl, opts: &DrillOptions) -> Result<()> {
    let mut report = Report::default();
    let result = drill(url, opts, &mut report).await;
    if let Err(e) = &result {
        report.ok = false;
        report.error = Some(e.to_string());
    }
    if opts.json {
        crate::say!("{}", serde_json::to_string_pretty(&report).expect("json"));
    } else if report.ok {
        crate::say!(
            "drill: backup {} restored in {:.1} s, recovered and ready in {:.1} s; replayed to {} ({}), last commit {}; newest archived segment {} ({} behind){}",
            report.backup,
            report.restore_seconds,
            report.ready_seconds,
            report.replayed_lsn.as_deref().unwrap_or("?"),
            report.replayed_segment.as_deref().unwrap_or("?"),
            report
                .last_replayed_commit
                .as_deref()
                .unwrap_or("none replayed"),
            report.newest_archived_segment.as_deref().unwrap_or("?"),
            report
                .segments_behind_archive
                .map(|n| format!("{n} segments"))
                .unwrap_or_else(|| "?".into()),
            report
                .check_sql_result
                .as_deref()
                .map(|r| format!("; check-sql returned {r}"))
                .unwrap_or_default(),
        );
    } else if let Some(tail) = &report.server_log_tail {
        eprintln!("server log (last lines):\n{tail}");
    }
    result
}

async fn drill(url: &RepoUrl, opts: &DrillOptions, report: &mut Report) -> Result<()> {
    let started = Instant::now();
    let bindir = find_bindir(opts.pg_bin.as_deref())?;
    let exe =
        std::env::current_exe().context(|| "cannot find this walvault binary's path".into())?;
    if is_root() {
        let ok = Command::new("runuser")
            .args(["-u", "postgres", "--", "test", "-x"])
            .arg(&exe)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            return Err(Error::usage(format!(
                "the postgres OS user cannot run {} (restore_command needs it); install walvault where it can, e.g. /usr/local/bin",
                exe.display()
            )));
        }
    }
    let parent = opts
        .scratch_parent
        .clone()
        .unwrap_or_else(std::env::temp_dir);
    let dir = make_private_dir(&parent)?;
    let mut scratch = Scratch {
        data: dir.join("data"),
        dir,
        bindir,
        started: false,
    };

    let restored = restore::restore(
        url,
        &RestoreOptions {
            pgdata: scratch.data.clone(),
            backup: opts.backup.clone(),
            target: opts.target.clone(),
            target_action: Some(restore::TargetAction::Promote),
            standby: false,
            primary_conninfo: None,
            jobs: opts.jobs,
            tablespace_map: vec![],
            target_timeline: crate::commands::restore::TargetTimeline::Latest,
            target_exclusive: false,
            recovery_options: vec![],
            // The scratch server's own settings turn archiving off.
            archive_mode: crate::commands::restore::ArchiveMode::Off,
            // Tablespaces live in the scratch directory too: never where
            // the backed-up server kept them.
            tablespaces_under: Some(scratch.dir.clone()),
        },
    )
    .await?;
    report.backup = restored.backup_id.clone();
    report.restore_seconds = restored.seconds;

    // The scratch server must not touch anything of the real one's, and no
    // one but the drill's own OS user may reach it: a superuser session is a
    // shell as the server's OS user (COPY ... TO PROGRAM). Its socket lives in
    // the private scratch directory with mode 0700, there is no TCP, and only
    // the drill's OS user is let in, as the database user it asks for.
    let db_user = std::env::var("PGUSER").unwrap_or_else(|_| "postgres".into());
    let os_user = effective_user_name()?;
    let conf = scratch.data.join("postgresql.conf");
    if !conf.exists() {
        // Debian keeps postgresql.conf outside the data directory.
        create_new_file(&conf, b"")?;
    }
    let hba = scratch.dir.join("drill_hba.conf");
    create_new_file(&hba, hba_text(&db_user)?.as_bytes())?;
    let ident = scratch.dir.join("drill_ident.conf");
    create_new_file(&ident, ident_text(&os_user, &db_user)?.as_bytes())?;
    let settings = format!(
        "# walvault drill\nlisten_addresses = ''\nunix_socket_directories = {dir}\n\
         unix_socket_permissions = 0700\nport = 5432\narchive_mode = off\nhba_file = {hba}\n\
         ident_file = {ident}\nssl = off\nhot_standby = on\nlogging_collector = off\n\
         shared_preload_libraries = ''\n",
        dir = conf_quote(&scratch.dir.to_string_lossy()),
        hba = conf_quote(&hba.to_string_lossy()),
        ident = conf_quote(&ident.to_string_lossy()),
    );
    append_to_file(
        &scratch.data.join("postgresql.auto.conf"),
        settings.as_bytes(),
    )?;
    chown_to_postgres(&scratch.dir)?;

    // The archive as recovery starts: replay must reach its end. A live
    // primary may archive more while the drill runs; replay need not see that.
    let root_repo = Repository::open(url, false)?;
    let root = root_repo.require_config().await?;
    let current = root_repo.current(&root);
    let (repo, segment_size) = (current.repo, current.config.wal_segment_size);
    let archive = WalArchive::load(&repo, segment_size).await?;

    let out = server_command(&scratch.bindir.join("pg_ctl"))
        .arg("-D")
        .arg(&scratch.data)
        .arg("-l")
        .arg(scratch.log())
        .args(["-w", "-t", &opts.timeout.as_secs().to_string(), "start"])
        .output()
        .context(|| "cannot run pg_ctl".into())?;
    scratch.started = true;
    if !out.status.success() {
        let tail = scratch.log_tail();
        report.server_log_tail = Some(tail.clone());
        return Err(recovery_stop_reason(&tail).unwrap_or_else(|| {
            Error::io(format!(
                "the restored server did not start: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }));
    }

    let mut config = tokio_postgres::Config::new();
    config
        .host_path(&scratch.dir)
        .port(5432)
        .user(&db_user)
        .dbname("postgres");
    let (client, connection) = match config.connect(tokio_postgres::NoTls).await {
        Ok(c) => c,
        Err(e) => {
            // The server may have stopped itself between accepting
            // connections and our connecting (see below).
            let tail = stopped_server_log(&scratch).await;
            report.server_log_tail = Some(tail.clone());
            return Err(recovery_stop_reason(&tail).unwrap_or_else(|| {
                Error::io(format!("cannot connect to the restored server: {e}"))
            }));
        }
    };
    tokio::spawn(connection);
    let deadline = Instant::now() + opts.timeout;
    loop {
        let row = match client.query_one("SELECT pg_is_in_recovery()", &[]).await {
            Ok(row) => row,
            Err(e) => {
                // Most often the server stopped itself: fetch stops archive
                // recovery on purpose when a WAL file cannot be delivered.
                let tail = stopped_server_log(&scratch).await;
                report.server_log_tail = Some(tail.clone());
                return Err(recovery_stop_reason(&tail)
                    .unwrap_or_else(|| Error::io(format!("restored server: {e}"))));
            }
        };
        if !row.get::<_, bool>(0) {
            break;
        }
        if Instant::now() > deadline {
            report.server_log_tail = Some(scratch.log_tail());
            return Err(Error::io(format!(
                "recovery did not finish within {} s",
                opts.timeout.as_secs()
            )));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    report.ready_seconds = started.elapsed().as_secs_f64();
    let query = |sql: &'static str| client.query_one(sql, &[]);
    query("SELECT 1")
        .await
        .map_err(|e| Error::io(format!("SELECT 1 failed: {e}")))?;
    let row = query("SELECT pg_last_wal_replay_lsn()::text, pg_last_xact_replay_timestamp()::text")
        .await
        .map_err(|e| Error::io(format!("restored server: {e}")))?;
    report.replayed_lsn = row.get(0);
    report.last_replayed_commit = row.get(1);
    // Replay to the end of the archive: the timeline it ended on, and where.
    // (A recovery target PostgreSQL does not reach stops it with FATAL.)
    let end_of_recovery = if opts.target == RecoveryTarget::Latest {
        let row = query("SELECT substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8)")
            .await
            .map_err(|e| Error::io(format!("restored server: {e}")))?;
        let timeline: String = row.get(0);
        Some(end_of_recovery(&scratch.data, &timeline)?)
    } else {
        None
    };
    if let Some(sql) = &opts.check_sql {
        let rows = client.simple_query(sql).await.map_err(|e| {
            Error::io(format!(
                "--check-sql failed: {}",
                e.as_db_error()
                    .map(|d| d.message().to_string())
                    .unwrap_or(e.to_string())
            ))
        })?;
        let first = rows.iter().find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => {
                Some(r.get(0).unwrap_or("NULL").to_string())
            }
            _ => None,
        });
        report.check_sql_result = Some(first.unwrap_or_else(|| "no rows".into()));
    }

    // How far the restore got, against the newest WAL in the archive.
    if let Some(newest) = archive.newest() {
        report.newest_archived_segment = Some(newest.name.to_string());
        if let (Some(lsn), crate::pg::wal::WalFileName::Segment(seg)) = (
            report.replayed_lsn.as_deref().and_then(parse_lsn),
            newest.name,
        ) {
            // The LSN is the end of the last record: at a segment boundary it
            // belongs to the segment before.
            let replayed =
                SegmentName::containing(seg.timeline, lsn.saturating_sub(1), segment_size);
            report.replayed_segment = Some(replayed.to_string());
            report.replayed_lsn = Some(format_lsn(lsn));
            report.segments_behind_archive = Some(
                seg.segno(segment_size)
                    .saturating_sub(replayed.segno(segment_size)),
            );
        }
    }
    if let Some((timeline, end)) = end_of_recovery
        && let Err(e) = check_replay_reached_archive_end(&archive, timeline, end)
    {
        report.server_log_tail = Some(scratch.log_tail());
        return Err(e);
    }
    drop(client);
    scratch.stop();
    report.ok = true;
    Ok(())
}

/// The timeline archive recovery ended on and the LSN where it stopped: the
/// last line of the history file of the timeline it promoted to
/// (`<parent timeline>\t<switch LSN>\t<reason>`).
fn end_of_recovery(data: &Path, new_timeline: &str) -> Result<(u32, u64)> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let unreadable = || {
        Error::io(format!(
            "cannot tell where the restored server's recovery ended: pg_wal/{}.history is missing or unreadable",
            new_timeline.escape_debug()
        ))
    };
    if new_timeline.len() != 8 || !new_timeline.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(unreadable());
    }
    let mut text = String::new();
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(data.join("pg_wal").join(format!("{new_timeline}.history")))
        .and_then(|f| f.take(1 << 20).read_to_string(&mut text))
        .map_err(|_| unreadable())?;
    parse_history_end(&text).ok_or_else(unreadable)
}

/// The last entry of a timeline history file: parent timeline and switch LSN.
fn parse_history_end(text: &str) -> Option<(u32, u64)> {
    let line = text
        .lines()
        .map(str::trim)
        .rfind(|l| !l.is_empty() && !l.starts_with('#'))?;
    let mut fields = line.split_whitespace();
    let timeline = fields.next()?.parse().ok()?;
    let lsn = parse_lsn(fields.next()?)?;
    Some((timeline, lsn))
}

/// Replay to latest must end in the newest segment archived on the timeline
/// it ended on. Ending earlier means a segment before it was missing, damaged
/// or could not be delivered, and PostgreSQL took that for the end of the
/// archive: a restore would silently lose everything after it.
fn check_replay_reached_archive_end(archive: &WalArchive, timeline: u32, end: u64) -> Result<()> {
    let size = archive.segment_size;
    let Some((&newest, _)) = archive
        .segments
        .get(&timeline)
        .and_then(|segments| segments.last_key_value())
    else {
        return Ok(());
    };
    // The end LSN is the end of the last record: at a segment boundary it
    // belongs to the segment before.
    let replayed = SegmentName::containing(timeline, end.saturating_sub(1), size);
    if replayed.segno(size) >= newest {
        return Ok(());
    }
    let newest = SegmentName::of_segno(timeline, newest, size);
    Err(Error::corrupt(format!(
        "replay stopped at LSN {} in segment {replayed}, short of the archive's end on timeline {timeline} (segment {newest}): WAL after it is missing or could not be delivered (the server log says which); a restore to latest would lose it, run 'walvault verify'",
        format_lsn(end)
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_end_is_the_last_entry() {
        let text =
            "1\t0/3000000\tno recovery target specified\n\n2\t0/5A00028\tbefore 2026-01-01\n";
        assert_eq!(parse_history_end(text), Some((2, 0x5A0_0028)));
        assert_eq!(parse_history_end("# nothing\n"), None);
        assert_eq!(parse_history_end("x\t0/1\n"), None);
    }

    #[test]
    fn only_the_drill_user_is_let_in() {
        assert_eq!(
            hba_text("postgres").unwrap(),
            "# walvault drill: the drill's OS user only, on the private socket\nlocal all \"postgres\" peer map=walvault_drill\n"
        );
        assert_eq!(
            ident_text("root", "postgres").unwrap(),
            "walvault_drill \"root\" \"postgres\"\n"
        );
        assert!(hba_text("a\"b").is_err());
        assert!(ident_text("root", "a\nb").is_err());
    }
}
