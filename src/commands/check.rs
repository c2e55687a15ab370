//! `walvault check`: from the database host, proves that archiving into this
//! repository works end to end and names everything that would make
//! archiving or a restore fail, before the day it matters.
//!
//! The decisive check is a round trip: force a WAL switch and wait, bounded,
//! until that segment is in the repository and decodes with a matching
//! checksum. The other checks explain why a round trip fails, or warn of
//! what would fail later (no backup yet, a full disk, a skewed clock).

use crate::error::{Error, ErrorKind, Result};
use crate::format::key::wal_key;
use crate::pg::client::connection_config;
use crate::pg::wal::WalFileName;
use crate::repository::catalog;
use crate::repository::{RepoUrl, Repository};
use chrono::{DateTime, Utc};
use clap::builder::TypedValueParser as _;
use serde::Serialize;
use std::time::{Duration, Instant};
use tokio_postgres::{Client, NoTls};

// The doc comments are `walvault check --help`.
#[derive(clap::Args)]
pub struct CheckOptions {
    /// Connection string or URL (default: PGHOST, PGPORT, PGUSER, PGDATABASE, PGPASSWORD).
    #[arg(long, env = "WALVAULT_DBNAME", hide_env_values = true)]
    pub dbname: Option<String>,
    /// Seconds to wait for the switched segment to reach the repository.
    #[arg(long, default_value = "60",
          value_parser = clap::value_parser!(u64).map(Duration::from_secs))]
    pub timeout: Duration,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

#[derive(Serialize, Clone, Copy, PartialEq, Eq, Debug)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Ok,
    /// Worth knowing, does not fail the check.
    Warn,
    Fail,
    /// Could not be judged (an earlier failure, or a standby).
    Skip,
}

#[derive(Serialize, Debug)]
pub struct Finding {
    pub check: &'static str,
    pub verdict: Verdict,
    pub detail: String,
}

#[derive(Serialize)]
struct Report {
    repository: String,
    ok: bool,
    checks: Vec<Finding>,
}

/// Below this much free space a repository or pg_wal fails the check: a
/// few hundred segments, or one modest backup.
const MIN_FREE_BYTES: u64 = 1 << 30;
/// Clock skew between this host and the store past which status windows and
/// retention by age read wrong.
const MAX_SKEW: Duration = Duration::from_secs(60);

struct Checks(Vec<Finding>);

impl Checks {
    fn add(&mut self, check: &'static str, verdict: Verdict, detail: impl Into<String>) {
        self.0.push(Finding {
            check,
            verdict,
            detail: detail.into(),
        });
    }
}

pub async fn run(url: &RepoUrl, opts: &CheckOptions) -> Result<()> {
    let mut checks = Checks(vec![]);
    run_checks(url, opts, &mut checks).await;
    let failed: Vec<&'static str> = checks
        .0
        .iter()
        .filter(|f| f.verdict == Verdict::Fail)
        .map(|f| f.check)
        .collect();
    let ok = failed.is_empty();
    if opts.json {
        let report = Report {
            repository: url.to_string(),
            ok,
            checks: checks.0,
        };
        crate::say!(
            "{}",
            serde_json::to_string_pretty(&report).expect("a report serializes")
        );
    } else {
        for f in &checks.0 {
            let verdict = match f.verdict {
                Verdict::Ok => "ok",
                Verdict::Warn => "warn",
                Verdict::Fail => "FAIL",
                Verdict::Skip => "skip",
            };
            crate::say!("{verdict:<5} {:<16} {}", f.check, f.detail);
        }
    }
    if ok {
        return Ok(());
    }
    Err(Error::new(
        ErrorKind::Unhealthy,
        format!(
            "check of {url} failed ({}); fix what those lines name and run it again",
            failed.join(", ")
        ),
    ))
}

async fn run_checks(url: &RepoUrl, opts: &CheckOptions, checks: &mut Checks) {
    // The server: everything else is judged against what it says.
    let server = match connect(opts.dbname.as_deref()).await {
        Ok(s) => s,
        Err(e) => {
            checks.add("server", Verdict::Fail, e.to_string());
            return;
        }
    };
    let info = match server_facts(&server).await {
        Ok(info) => info,
        Err(e) => {
            checks.add("server", Verdict::Fail, e.to_string());
            return;
        }
    };
    let major = info.version_num / 10000;
    let (oldest, newest) = crate::pg::wal::SUPPORTED_VERSIONS;
    checks.add(
        "server",
        if (oldest..=newest).contains(&major) {
            Verdict::Ok
        } else {
            Verdict::Fail
        },
        format!(
            "PostgreSQL {} (walvault supports {oldest} to {newest}), system identifier {}{}",
            info.version.split_whitespace().next().unwrap_or("?"),
            info.system_identifier,
            if info.in_recovery { ", a standby" } else { "" }
        ),
    );
    judge_archive_settings(&info, url, checks);

    let repo = match Repository::open(url, false) {
        Ok(r) => r,
        Err(e) => {
            checks.add("repository", Verdict::Fail, e.to_string());
            return;
        }
    };
    let namespace = match repo.config().await {
        Ok(Some(root)) => {
            let config = root.current_cluster();
            if config.system_identifier != info.system_identifier {
                checks.add(
                    "repository",
                    Verdict::Fail,
                    format!(
                        "{url} belongs to cluster {}, this server is {}: its pushes are refused",
                        config.system_identifier, info.system_identifier
                    ),
                );
            } else if config.wal_segment_size != info.wal_segment_size {
                checks.add(
                    "repository",
                    Verdict::Fail,
                    format!(
                        "{url} holds {}-byte segments, this server writes {}-byte ones",
                        config.wal_segment_size, info.wal_segment_size
                    ),
                );
            } else {
                checks.add(
                    "repository",
                    Verdict::Ok,
                    format!("{url}, bound to this cluster"),
                );
            }
            root.current_namespace().map(str::to_string)
        }
        Ok(None) => {
            checks.add(
                "repository",
                Verdict::Warn,
                format!("{url} holds nothing yet: the first push binds it to this cluster"),
            );
            None
        }
        Err(e) => {
            checks.add("repository", Verdict::Fail, e.to_string());
            return;
        }
    };
    // After an upgrade, the current cluster's objects are in its folder.
    let repo = repo.view(namespace.as_deref());
    judge_archiver(&info, checks);
    judge_local_space(url, info.data_directory.as_deref(), checks);

    // The round trip, which proves the rest.
    if info.in_recovery {
        checks.add(
            "round trip",
            Verdict::Skip,
            "a standby cannot switch WAL: run check against the primary",
        );
    } else {
        round_trip(&server, &repo, opts.timeout, checks).await;
    }
    judge_backups(&repo, checks).await;
}

async fn connect(dbname: Option<&str>) -> Result<Client> {
    let config = connection_config(dbname)?;
    let (client, connection) = config
        .connect(NoTls)
        .await
        .map_err(|e| Error::io(format!("cannot connect to PostgreSQL: {e}")))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

struct ServerFacts {
    version: String,
    version_num: u32,
    system_identifier: String,
    wal_segment_size: u32,
    data_directory: Option<String>,
    in_recovery: bool,
    archive_mode: String,
    archive_command: String,
    /// pg_stat_archiver: last archived and last failed WAL with their times.
    last_archived: Option<(String, DateTime<Utc>)>,
    last_failed: Option<(String, DateTime<Utc>)>,
}

async fn server_facts(client: &Client) -> Result<ServerFacts> {
    let row = client
        .query_one(
            "SELECT current_setting('server_version'), \
                    current_setting('server_version_num')::int4, \
                    (SELECT system_identifier::text FROM pg_control_system()), \
                    (SELECT setting::int4 FROM pg_settings WHERE name = 'wal_segment_size'), \
                    (SELECT setting FROM pg_settings WHERE name = 'data_directory'), \
                    pg_is_in_recovery(), \
                    current_setting('archive_mode'), \
                    current_setting('archive_command'), \
                    a.last_archived_wal, a.last_archived_time, \
                    a.last_failed_wal, a.last_failed_time \
             FROM pg_stat_archiver a",
            &[],
        )
        .await
        .map_err(|e| {
            let detail = e
                .as_db_error()
                .map(|d| d.message().to_string())
                .unwrap_or_else(|| e.to_string());
            Error::io(format!(
                "cannot read the server's settings ({detail}); check as a superuser or a \
                 member of pg_read_all_settings and pg_monitor"
            ))
        })?;
    let pair = |name: usize, time: usize| -> Option<(String, DateTime<Utc>)> {
        Some((row.get::<_, Option<String>>(name)?, row.get(time)))
    };
    Ok(ServerFacts {
        version: row.get(0),
        version_num: row.get::<_, i32>(1) as u32,
        system_identifier: row.get(2),
        wal_segment_size: row.get::<_, i32>(3) as u32,
        data_directory: row.get(4),
        in_recovery: row.get(5),
        archive_mode: row.get(6),
        archive_command: row.get(7),
        last_archived: pair(8, 9),
        last_failed: pair(10, 11),
    })
}

fn judge_archive_settings(info: &ServerFacts, url: &RepoUrl, checks: &mut Checks) {
    let mode_ok = match info.archive_mode.as_str() {
        "always" => true,
        "on" => !info.in_recovery,
        _ => false,
    };
    checks.add(
        "archive_mode",
        if mode_ok { Verdict::Ok } else { Verdict::Fail },
        match (info.archive_mode.as_str(), info.in_recovery) {
            ("off", _) => "off: nothing is archived; set archive_mode = on and restart".into(),
            ("on", true) => {
                "on, but a standby archives only with 'always': the primary must push".into()
            }
            (mode, _) => mode.to_string(),
        },
    );
    let command = info.archive_command.trim();
    let (verdict, detail) = if command.is_empty() || command == "(disabled)" {
        (
            Verdict::Fail,
            "archive_command is empty: set archive_command = 'walvault --repo URL push %p %f'"
                .to_string(),
        )
    } else if !command.contains("walvault") || !command.contains("push") {
        (
            Verdict::Fail,
            format!("'{command}' does not run walvault push"),
        )
    } else if !command.contains(&url.to_string()) {
        // The repository may come from WALVAULT_REPO in the server's
        // environment; the round trip decides.
        (
            Verdict::Warn,
            format!("'{command}' does not name {url}; the round trip shows where WAL goes"),
        )
    } else {
        (Verdict::Ok, format!("'{command}'"))
    };
    checks.add("archive_command", verdict, detail);
}

fn judge_archiver(info: &ServerFacts, checks: &mut Checks) {
    match (&info.last_archived, &info.last_failed) {
        (archived, Some((wal, failed_at)))
            if archived.as_ref().is_none_or(|(_, at)| at < failed_at) =>
        {
            checks.add(
                "archiver",
                Verdict::Fail,
                format!(
                    "the last attempt failed: {wal} at {}; see the server log for walvault's line",
                    failed_at.format("%Y-%m-%d %H:%M:%S UTC")
                ),
            )
        }
        (Some((wal, at)), _) => checks.add(
            "archiver",
            Verdict::Ok,
            format!(
                "last archived {wal} at {}",
                at.format("%Y-%m-%d %H:%M:%S UTC")
            ),
        ),
        (None, _) => checks.add("archiver", Verdict::Ok, "nothing archived yet"),
    }
}

/// Free space where walvault writes on this host: a filesystem repository,
/// and pg_wal (where WAL piles up while archiving fails).
fn judge_local_space(url: &RepoUrl, data_directory: Option<&str>, checks: &mut Checks) {
    let mut places: Vec<(&'static str, std::path::PathBuf)> = vec![];
    if let RepoUrl::Local(root) = url {
        places.push(("repository space", root.clone()));
    }
    if let Some(dir) = data_directory {
        places.push(("pg_wal space", std::path::Path::new(dir).join("pg_wal")));
    }
    for (check, path) in places {
        match crate::sys::free_bytes(&path) {
            Ok(free) if free < MIN_FREE_BYTES => checks.add(
                check,
                Verdict::Fail,
                format!(
                    "{} free on {}: under {}",
                    crate::human::human_bytes(free),
                    path.display(),
                    crate::human::human_bytes(MIN_FREE_BYTES)
                ),
            ),
            Ok(free) => checks.add(
                check,
                Verdict::Ok,
                format!(
                    "{} free on {}",
                    crate::human::human_bytes(free),
                    path.display()
                ),
            ),
            // pg_wal of a server on another host, or not readable by us.
            Err(e) => checks.add(check, Verdict::Skip, format!("{}: {e}", path.display())),
        }
    }
}

/// Switches WAL and waits for that segment to be in the repository, whole.
async fn round_trip(client: &Client, repo: &Repository, timeout: Duration, checks: &mut Checks) {
    // A small WAL record first: with nothing written since the last
    // switch, pg_switch_wal() would name a segment archived long ago.
    let switched = match client
        .query_one(
            "SELECT pg_walfile_name(pg_switch_wal()) \
             FROM (SELECT pg_logical_emit_message(false, 'walvault', 'check')) AS m",
            &[],
        )
        .await
    {
        Ok(row) => row.get::<_, String>(0),
        Err(e) => {
            checks.add(
                "round trip",
                Verdict::Fail,
                format!(
                    "cannot switch WAL: {e}; check needs a superuser (or EXECUTE on pg_switch_wal)"
                ),
            );
            return;
        }
    };
    let Ok(name) = WalFileName::parse(&switched) else {
        checks.add(
            "round trip",
            Verdict::Fail,
            format!("the server named '{switched}', not a WAL segment"),
        );
        return;
    };
    let key = wal_key(&name);
    let started = Instant::now();
    let stored = loop {
        match repo.get(&key).await {
            Ok(Some(bytes)) => break bytes,
            Ok(None) if started.elapsed() < timeout => {
                tokio::time::sleep(Duration::from_millis(250)).await
            }
            Ok(None) => {
                checks.add(
                    "round trip",
                    Verdict::Fail,
                    format!(
                        "{switched} is not in the repository {} s after the switch: check \
                         archive_command, and the server log for its errors",
                        timeout.as_secs()
                    ),
                );
                return;
            }
            Err(e) => {
                checks.add("round trip", Verdict::Fail, e.to_string());
                return;
            }
        }
    };
    let waited = started.elapsed();
    match crate::format::object::decode(&stored) {
        Ok((_, content)) => checks.add(
            "round trip",
            Verdict::Ok,
            format!(
                "{switched} archived {:.1} s after the switch and fetched back whole ({} bytes, \
                 sha256 proven)",
                waited.as_secs_f64(),
                content.len()
            ),
        ),
        Err(e) => {
            checks.add(
                "round trip",
                Verdict::Fail,
                format!("{switched} is in the repository but damaged: {e}"),
            );
            return;
        }
    }
    judge_clock(repo, &key, checks).await;
}

/// The store stamps objects with its own clock; status windows and
/// retention by age compare those stamps with this host's clock.
async fn judge_clock(repo: &Repository, key: &crate::format::key::Key, checks: &mut Checks) {
    let dir = key
        .as_ref()
        .rsplit_once('/')
        .map_or("", |(d, _)| d)
        .to_string();
    let Ok(listed) = repo.list(&dir).await else {
        return;
    };
    let Some(meta) = listed.iter().find(|m| m.key == *key) else {
        return;
    };
    let now = Utc::now();
    let skew = (now - meta.last_modified).num_milliseconds().unsigned_abs();
    let skew = Duration::from_millis(skew);
    // The object was written moments ago: a stamp far from now is the
    // store's clock (or ours), not the age of the object.
    let verdict = if skew > MAX_SKEW {
        Verdict::Warn
    } else {
        Verdict::Ok
    };
    checks.add(
        "clock",
        verdict,
        format!(
            "the store stamped the segment {:.1} s from this host's clock{}",
            skew.as_secs_f64(),
            if verdict == Verdict::Warn {
                ": ages in status and prune --keep-within are off by as much; sync the clocks"
            } else {
                ""
            }
        ),
    );
}

async fn judge_backups(repo: &Repository, checks: &mut Checks) {
    match catalog::load_readable(repo).await {
        Ok(backups) => match backups.iter().max_by_key(|b| b.stop_time) {
            Some(newest) => {
                let age = Utc::now() - newest.stop_time;
                checks.add(
                    "backups",
                    Verdict::Ok,
                    format!(
                        "{} backup(s); the newest, {}, finished {} ago",
                        backups.len(),
                        newest.id,
                        crate::human::format_duration(age.to_std().unwrap_or_default())
                    ),
                );
            }
            None => checks.add(
                "backups",
                Verdict::Fail,
                "no backup yet: nothing can be restored; run 'walvault backup'",
            ),
        },
        Err(e) => checks.add("backups", Verdict::Fail, e.to_string()),
    }
}
