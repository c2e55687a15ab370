//! `walvault drill`: prove a restore end to end. Restore a backup into a
//! scratch directory, start PostgreSQL on it, let it recover, query it, report,
//! stop it and clean up.

use crate::archive::WalArchive;
use crate::commands::restore::{self, RecoveryTarget, RestoreOptions};
use crate::error::{Context, Error, Result};
use crate::repository::{RepoUrl, Repository};
use crate::wal::{SegmentName, format_lsn, parse_lsn};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

pub struct DrillOptions {
    pub backup: Option<String>,
    pub target: RecoveryTarget,
    pub pg_bin: Option<PathBuf>,
    pub check_sql: Option<String>,
    pub json: bool,
    /// Where to make the scratch directory (default: the system temp dir).
    pub scratch_parent: Option<PathBuf>,
    pub timeout: Duration,
    pub jobs: usize,
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

fn is_root() -> bool {
    unsafe { libc::geteuid() == 0 }
}

/// `--pg-bin`, else `pg_config --bindir`, else the directory of `postgres` on PATH.
fn find_bindir(given: Option<&Path>) -> Result<PathBuf> {
    if let Some(d) = given {
        return Ok(d.to_path_buf());
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output()
        && out.status.success()
    {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if dir.join("postgres").exists() {
            return Ok(dir);
        }
    }
    std::env::var_os("PATH")
        .and_then(|paths| std::env::split_paths(&paths).find(|p| p.join("postgres").exists()))
        .ok_or_else(|| Error::usage("cannot find PostgreSQL's server binaries: give --pg-bin DIR"))
}

/// A command run as the `postgres` OS user when we are root (the server
/// refuses to run as root).
fn server_command(program: &Path) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

fn chown_to_postgres(path: &Path) -> Result<()> {
    if !is_root() {
        return Ok(());
    }
    let status = Command::new("chown")
        .args(["-R", "postgres:"])
        .arg(path)
        .status()
        .context(|| "cannot run chown".into())?;
    if !status.success() {
        return Err(Error::io(format!(
            "cannot hand {} to the postgres OS user",
            path.display()
        )));
    }
    Ok(())
}

struct Scratch {
    dir: PathBuf,
    data: PathBuf,
    bindir: PathBuf,
    started: bool,
}

impl Scratch {
    fn log(&self) -> PathBuf {
        self.dir.join("server.log")
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.log()).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    fn stop(&mut self) {
        if self.started {
            let _ = server_command(&self.bindir.join("pg_ctl"))
                .args(["-D"])
                .arg(&self.data)
                .args(["-m", "fast", "-w", "-t", "60", "stop"])
                .output();
            self.started = false;
        }
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
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
    let dir = parent.join(format!(
        "walvault-drill-{}-{}",
        std::process::id(),
        chrono::Utc::now().format("%Y%m%dT%H%M%S")
    ));
    std::fs::create_dir_all(&dir)
        .context(|| format!("cannot create scratch directory {}", dir.display()))?;
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
            target_action: Some("promote".into()),
            standby: false,
            primary_conninfo: None,
            jobs: opts.jobs,
            tablespace_map: vec![],
        },
    )
    .await?;
    report.backup = restored.backup_id.clone();
    report.restore_seconds = restored.seconds;

    // The scratch server must not touch anything of the real one's: its own
    // socket, no TCP, no archiving, trust on its private socket only.
    let conf = scratch.data.join("postgresql.conf");
    if !conf.exists() {
        // Debian keeps postgresql.conf outside the data directory.
        std::fs::write(&conf, b"").context(|| format!("cannot create {}", conf.display()))?;
    }
    let hba = scratch.dir.join("drill_hba.conf");
    std::fs::write(&hba, b"local all all trust\n")
        .context(|| format!("cannot write {}", hba.display()))?;
    let mut auto = std::fs::OpenOptions::new()
        .append(true)
        .open(scratch.data.join("postgresql.auto.conf"))
        .context(|| "cannot open postgresql.auto.conf".into())?;
    use std::io::Write;
    writeln!(
        auto,
        "# walvault drill\nlisten_addresses = ''\nunix_socket_directories = '{dir}'\nport = 5432\n\
         archive_mode = off\nhba_file = '{hba}'\nssl = off\nhot_standby = on\nlogging_collector = off\n\
         shared_preload_libraries = ''",
        dir = scratch.dir.display(),
        hba = hba.display()
    )
    .context(|| "cannot write postgresql.auto.conf".into())?;
    drop(auto);
    chown_to_postgres(&scratch.dir)?;

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
        report.server_log_tail = Some(scratch.log_tail());
        return Err(Error::io(format!(
            "the restored server did not start: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }

    let mut config = tokio_postgres::Config::new();
    config
        .host_path(&scratch.dir)
        .port(5432)
        .user(
            std::env::var("PGUSER")
                .ok()
                .as_deref()
                .unwrap_or("postgres"),
        )
        .dbname("postgres");
    let (client, connection) = config
        .connect(tokio_postgres::NoTls)
        .await
        .map_err(|e| Error::io(format!("cannot connect to the restored server: {e}")))?;
    tokio::spawn(connection);
    let deadline = Instant::now() + opts.timeout;
    loop {
        let row = client
            .query_one("SELECT pg_is_in_recovery()", &[])
            .await
            .map_err(|e| Error::io(format!("restored server: {e}")))?;
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
    let repo = Repository::open(url, false)?;
    let config = repo.require_config().await?;
    let archive = WalArchive::load(&repo, config.wal_segment_size).await?;
    if let Some(newest) = archive.newest() {
        report.newest_archived_segment = Some(newest.name.to_string());
        if let (Some(lsn), crate::wal::WalFileName::Segment(seg)) = (
            report.replayed_lsn.as_deref().and_then(parse_lsn),
            newest.name,
        ) {
            // The LSN is the end of the last record: at a segment boundary it
            // belongs to the segment before.
            let replayed = SegmentName::containing(
                seg.timeline,
                lsn.saturating_sub(1),
                config.wal_segment_size,
            );
            report.replayed_segment = Some(replayed.to_string());
            report.replayed_lsn = Some(format_lsn(lsn));
            report.segments_behind_archive = Some(
                seg.segno(config.wal_segment_size)
                    .saturating_sub(replayed.segno(config.wal_segment_size)),
            );
        }
    }
    drop(client);
    scratch.stop();
    report.ok = true;
    Ok(())
}
