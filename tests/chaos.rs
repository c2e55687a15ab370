//! The fault suite (`make chaos`, docs/reliability.md): walvault under
//! faults, against real PostgreSQL, with figures. Each scenario asserts that
//! nothing was lost and appends what it did and found to the report named by
//! `WALVAULT_CHAOS_REPORT` (when set).
//!
//! Not part of `make test`: a storm runs for minutes.

mod common;

use common::*;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Appends a scenario's section to the report, if one is being written.
fn report(section: &str) {
    eprintln!("{section}");
    if let Some(path) = std::env::var_os("WALVAULT_CHAOS_REPORT") {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .unwrap();
        writeln!(f, "{section}").unwrap();
    }
}

/// A small xorshift generator: the storm's choices, reproducible from a seed
/// printed in the report.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// Running processes of the walvault binary at `bin`, with the verb each runs.
fn walvault_processes(bin: &Path) -> Vec<(i32, String)> {
    let mut found = vec![];
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return found;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(exe) = std::fs::read_link(entry.path().join("exe")) else {
            continue;
        };
        if exe != bin {
            continue;
        }
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let verb = args
            .iter()
            .skip(1)
            .find(|a| {
                [
                    "push",
                    "push-ahead",
                    "fetch",
                    "fetch-ahead",
                    "backup",
                    "prune",
                    "restore",
                    "verify",
                ]
                .contains(&a.as_str())
            })
            .cloned()
            .unwrap_or_else(|| "other".into());
        found.push((pid, verb));
    }
    found
}

/// Sums that tell whether two pgbench databases hold the same rows.
fn pgbench_fingerprint(server: &PgServer) -> String {
    server.sql(
        "SELECT (SELECT count(*) FROM pgbench_history) || ':' || \
                (SELECT sum(abalance) FROM pgbench_accounts) || ':' || \
                (SELECT sum(bbalance) FROM pgbench_branches) || ':' || \
                (SELECT sum(tbalance) FROM pgbench_tellers)",
    )
}

/// Scenario 1: SIGKILL a random walvault process (push, the push-ahead
/// worker, backup, prune, verify) every 50-300 ms under pgbench load, at
/// least `WALVAULT_CHAOS_KILLS` times (default 200). Then let archiving
/// drain and prove: every segment PostgreSQL was told is archived (a shadow
/// copy taken by the archive_command after walvault's exit 0) fetches
/// byte-identical; verify is clean; a restore of every backup to the end of
/// the archive holds exactly the primary's rows.
#[test]
#[ignore = "the fault suite: make chaos"]
fn kill_storm_filesystem() {
    let kills_wanted: usize = std::env::var("WALVAULT_CHAOS_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    let dir = scratch();
    let root = dir.path().to_path_buf();
    let bin = install_binary(&root);
    let repo = RepoTarget::local(&root.join("repo"));
    let shadow = root.join("shadow");
    std::fs::create_dir(&shadow).unwrap();
    give_to_postgres(&shadow);
    // The shadow copy is taken only after walvault said "stored": it is
    // exactly the set PostgreSQL may now recycle.
    let archive_command = format!(
        "{} && cp %p {}/%f.tmp && mv {}/%f.tmp {}/%f",
        repo.push_command(&bin),
        shadow.display(),
        shadow.display(),
        shadow.display()
    );
    let mut primary = PgServer::init(
        &root.join("primary"),
        PgConfig {
            wal_segsize_mb: 1,
            conf: &format!(
                "archive_mode = on\narchive_command = '{archive_command}'\narchive_timeout = 0"
            ),
            env: vec![],
        },
    );
    primary.start();
    let pgbench = || {
        let mut c = Command::new("pgbench");
        c.arg("-h").arg(&primary.socket_dir).args([
            "-p",
            &primary.port.to_string(),
            "-U",
            "postgres",
        ]);
        c
    };
    run_capture(pgbench().args(["-i", "-q", "-s", "4", "postgres"]));

    let stop = Arc::new(AtomicBool::new(false));
    let kills = Arc::new(AtomicUsize::new(0));
    let killed_by_verb = Arc::new(std::sync::Mutex::new(BTreeMap::<String, usize>::new()));

    // Load: pgbench until the storm is over.
    let mut load = pgbench()
        .args(["-c", "2", "-T", "600", "-n", "postgres"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();

    // Maintenance that gets killed too: backups, prunes and verifies in turn.
    let maintenance = {
        let (stop, repo, bin, env, data) = (
            stop.clone(),
            repo.clone(),
            bin.clone(),
            primary.libpq_env(),
            primary.data.clone(),
        );
        std::thread::spawn(move || {
            let mut round = 0u64;
            let mut outcomes = BTreeMap::<String, usize>::new();
            while !stop.load(Ordering::Relaxed) && round < 10_000 {
                let (verb, args): (&str, Vec<String>) = match round % 4 {
                    0 | 2 => (
                        "backup",
                        vec![
                            "backup".into(),
                            "--archive-timeout".into(),
                            "30".into(),
                            "--pgdata".into(),
                            data.display().to_string(),
                        ],
                    ),
                    1 => (
                        "prune",
                        vec!["prune".into(), "--keep-last".into(), "3".into()],
                    ),
                    _ => ("verify", vec!["verify".into()]),
                };
                let out = repo
                    .walvault_as_postgres(&bin)
                    .envs(env.clone())
                    .args(&args)
                    .output()
                    .unwrap();
                let code = out.status.code().map_or("signal".into(), |c| c.to_string());
                *outcomes.entry(format!("{verb} {code}")).or_default() += 1;
                round += 1;
                std::thread::sleep(Duration::from_millis(200));
            }
            outcomes
        })
    };

    // The storm.
    let started = Instant::now();
    let mut rng = Rng(seed);
    let mut seen = 0usize;
    while kills.load(Ordering::Relaxed) < kills_wanted
        && started.elapsed() < Duration::from_secs(900)
    {
        std::thread::sleep(Duration::from_millis(50 + rng.below(251)));
        let procs = walvault_processes(&bin);
        seen = seen.max(procs.len());
        if procs.is_empty() {
            continue;
        }
        let (pid, verb) = &procs[rng.below(procs.len() as u64) as usize];
        // kill(1) keeps this test free of unsafe code.
        let killed = Command::new("kill")
            .args(["-9", &pid.to_string()])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if killed {
            kills.fetch_add(1, Ordering::Relaxed);
            *killed_by_verb
                .lock()
                .unwrap()
                .entry(verb.clone())
                .or_default() += 1;
        }
    }
    let storm = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let _ = load.kill();
    let _ = load.wait();
    let outcomes = maintenance.join().unwrap();

    // Drain: everything written so far must reach the repository.
    let last = primary.switch_wal();
    primary.wait_archived(&last);
    let final_rows = pgbench_fingerprint(&primary);
    // A backup nobody kills: at least one must exist to restore.
    {
        let out = repo
            .walvault_as_postgres(&bin)
            .envs(primary.libpq_env())
            .args(["backup", "--archive-timeout", "120", "--pgdata"])
            .arg(&primary.data)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "backup after the storm: {}",
            describe(&out)
        );
    };
    let last = primary.switch_wal();
    primary.wait_archived(&last);

    // 1. Every shadowed segment fetches byte-identical.
    let fetched_dir = root.join("fetched");
    std::fs::create_dir(&fetched_dir).unwrap();
    let mut shadowed: Vec<PathBuf> = std::fs::read_dir(&shadow)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| !p.to_string_lossy().ends_with(".tmp"))
        .collect();
    shadowed.sort();
    let mut lost = vec![];
    for original in &shadowed {
        let name = original.file_name().unwrap().to_str().unwrap();
        let target = fetched_dir.join(name);
        let out = repo
            .walvault(&bin)
            .args(["fetch", "--prefetch", "0", name])
            .arg(&target)
            .output()
            .unwrap();
        if !out.status.success()
            || std::fs::read(&target).ok() != Some(std::fs::read(original).unwrap())
        {
            lost.push(format!("{name} ({})", describe(&out).replace('\n', " ")));
        }
        let _ = std::fs::remove_file(&target);
    }

    // 2. verify is clean.
    let verify = repo.walvault(&bin).arg("verify").output().unwrap();

    // 3. Every backup restores to latest with exactly the primary's rows.
    let list = {
        let out = repo
            .walvault(&bin)
            .args(["list", "--json"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", describe(&out));
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let ids: Vec<String> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["id"].as_str().unwrap().to_string())
        .collect();
    // Archiving stops for the restores: they must see the same end.
    primary.stop();
    let mut restores = vec![];
    for (i, id) in ids.iter().enumerate() {
        let target = root.join(format!("restore-{i}"));
        let out = repo
            .walvault_as_postgres(&bin)
            .arg("restore")
            .arg("--pgdata")
            .arg(target.join("data"))
            .args(["--backup", id])
            .output()
            .unwrap();
        if !out.status.success() {
            restores.push(format!("{id}: restore failed: {}", describe(&out)));
            continue;
        }
        let mut server = PgServer::existing(&target, &target.join("data"), vec![]);
        server.append_conf("archive_mode = off");
        server.start();
        server.wait_promoted();
        let rows = pgbench_fingerprint(&server);
        restores.push(if rows == final_rows {
            format!("{id}: exact")
        } else {
            format!("{id}: rows {rows}, primary had {final_rows}")
        });
        drop(server);
        let _ = std::fs::remove_dir_all(&target);
    }

    let exact = restores.iter().filter(|r| r.ends_with(": exact")).count();
    let verdict =
        lost.is_empty() && verify.status.success() && exact == ids.len() && !ids.is_empty();
    report(&format!(
        "## 1. kill -9 storm, filesystem repository\n\n\
         Seed {seed}. pgbench (scale 4, 2 clients) on PostgreSQL with 1 MiB segments, archiving \
         through `walvault push` (push-ahead on); backup, prune --keep-last 3 and verify in turn \
         beside it; every 50-300 ms one running walvault process killed with SIGKILL.\n\n\
         | figure | value |\n|---|---|\n\
         | storm length | {:.0} s |\n| kills | {} ({}) |\n| most walvault processes at once | {seen} |\n\
         | maintenance runs (verb exit: count) | {} |\n\
         | segments PostgreSQL was told are archived (shadow copies) | {} |\n\
         | of those, not fetched byte-identical | {} |\n\
         | verify after the storm | exit {} |\n\
         | backups restored to latest with exactly the primary's rows | {exact} of {} |\n\n\
         Verdict: **{}**\n",
        storm.as_secs_f64(),
        kills.load(Ordering::Relaxed),
        killed_by_verb
            .lock()
            .unwrap()
            .iter()
            .map(|(v, n)| format!("{v} {n}"))
            .collect::<Vec<_>>()
            .join(", "),
        outcomes
            .iter()
            .map(|(v, n)| format!("{v}: {n}"))
            .collect::<Vec<_>>()
            .join(", "),
        shadowed.len(),
        lost.len(),
        verify
            .status
            .code()
            .map_or("by a signal".to_string(), |c| c.to_string()),
        ids.len(),
        if verdict {
            "nothing lost"
        } else {
            "LOSS OR DAMAGE"
        }
    ));
    assert!(lost.is_empty(), "segments lost: {lost:#?}");
    assert!(verify.status.success(), "verify: {}", describe(&verify));
    assert!(!ids.is_empty(), "no backup survived the storm");
    assert_eq!(exact, ids.len(), "restores: {restores:#?}");
}
