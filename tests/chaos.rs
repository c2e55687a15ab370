//! The fault suite (`make chaos`, docs/reliability.md): walvault under
//! faults, against real PostgreSQL, with figures. Each scenario asserts that
//! nothing was lost and appends what it did and found to the report named by
//! `WALVAULT_CHAOS_REPORT` (when set).
//!
//! Not part of `make test`: a storm runs for minutes.

#[path = "common/archiving.rs"]
mod archiving;
mod common;

use archiving::*;
use common::*;
use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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

#[test]
#[ignore = "the fault suite: make chaos"]
fn kill_storm_filesystem() {
    kill_storm(Backend::Filesystem);
}

#[test]
#[ignore = "the fault suite: make chaos"]
fn kill_storm_s3() {
    kill_storm(Backend::S3);
}

/// Scenario 1: SIGKILL a random walvault process every 50-300 ms under
/// pgbench load, at least `WALVAULT_CHAOS_KILLS` times (default 200). On
/// the archiving side: push and its push-ahead worker (the
/// archive_command), and backup, prune and verify in turn beside it. On the
/// recovery side: a standby's fetches with their prefetch workers, each
/// segment PostgreSQL archived in order, and restores of the newest backup.
/// Then let archiving drain and prove: every segment PostgreSQL was told is
/// archived (a shadow copy taken by the archive_command after walvault's
/// exit 0) fetches byte-identical through the stormed spool; verify is
/// clean; a restore of every backup to the end of the archive holds exactly
/// the primary's rows. And no fetch during the storm handed over a wrong
/// byte.
fn kill_storm(backend: Backend) {
    let kills_wanted: usize = std::env::var("WALVAULT_CHAOS_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let mut rng = Rng::from_clock();
    let seed = rng.0;
    let dir = scratch();
    let root = dir.path().to_path_buf();
    let bin = install_binary(&root);
    let (repo, _s3) = backend.repository(&root);
    let mut p = ShadowedPrimary::start(&root, &bin, &repo);
    // The recovery side restores the newest backup: there is one from the
    // start.
    let out = p.backup_command(60).output().unwrap();
    assert!(out.status.success(), "first backup: {}", describe(&out));

    let stop = Arc::new(AtomicBool::new(false));
    let kills = Arc::new(AtomicUsize::new(0));
    let killed_by_verb = Arc::new(Mutex::new(BTreeMap::<String, usize>::new()));
    let mut load = p.start_load();

    // Archiving side: backups, prunes and verifies in turn.
    let maintenance = {
        let stop = stop.clone();
        let (mut backup, mut prune, mut verify) = (
            p.backup_command(30),
            repo.walvault_as_postgres(&bin),
            repo.walvault_as_postgres(&bin),
        );
        prune.args(["prune", "--keep-last", "3"]);
        verify.arg("verify");
        std::thread::spawn(move || {
            let mut outcomes = Outcomes::new();
            let mut round = 0u64;
            while !stop.load(Ordering::Relaxed) && round < 10_000 {
                let (verb, cmd) = match round % 4 {
                    0 | 2 => ("backup", &mut backup),
                    1 => ("prune", &mut prune),
                    _ => ("verify", &mut verify),
                };
                let out = cmd.output().unwrap();
                count_outcome(&mut outcomes, verb, &out);
                round += 1;
                std::thread::sleep(Duration::from_millis(200));
            }
            outcomes
        })
    };

    // Recovery side: a standby fetching what was archived, in order, with
    // prefetch on; and restores of the newest backup into a scratch place.
    let standby = root.join("storm-standby");
    let standby_wal = standby.join("pg_wal");
    std::fs::create_dir_all(&standby_wal).unwrap();
    std::fs::write(standby.join("standby.signal"), b"").unwrap();
    let storm_spool = standby_wal.join("walvault-spool");
    let recovery = {
        let (stop, repo, bin, shadow) = (stop.clone(), repo.clone(), bin.clone(), p.shadow.clone());
        let (standby, standby_wal, restore_into) = (
            standby.clone(),
            standby_wal.clone(),
            root.join("storm-restore"),
        );
        std::thread::spawn(move || {
            let mut outcomes = Outcomes::new();
            let mut wrong = vec![];
            let mut next = String::new();
            let mut round = 0u64;
            while !stop.load(Ordering::Relaxed) && round < 100_000 {
                round += 1;
                if round.is_multiple_of(8) {
                    let _ = std::fs::remove_dir_all(&restore_into);
                    let out = repo
                        .walvault_as_postgres(&bin)
                        .arg("restore")
                        .arg("--pgdata")
                        .arg(restore_into.join("data"))
                        .output()
                        .unwrap();
                    count_outcome(&mut outcomes, "restore", &out);
                    continue;
                }
                // The next archived segment after the last one handed over.
                let mut archived: Vec<String> = std::fs::read_dir(&shadow)
                    .unwrap()
                    .filter_map(|e| e.ok()?.file_name().into_string().ok())
                    .filter(|n| n.len() == 24 && *n > next)
                    .collect();
                archived.sort();
                let Some(name) = archived.first().cloned() else {
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                };
                let target = standby_wal.join("RECOVERYXLOG");
                let _ = std::fs::remove_file(&target);
                let out = repo
                    .walvault(&bin)
                    .current_dir(&standby)
                    .arg("fetch")
                    .arg(&name)
                    .arg(&target)
                    .output()
                    .unwrap();
                count_outcome(&mut outcomes, "fetch", &out);
                if out.status.success() {
                    if std::fs::read(&target).ok() != std::fs::read(shadow.join(&name)).ok() {
                        wrong.push(name.clone());
                    }
                    next = name;
                } else if out.status.code() == Some(1) {
                    // Only what prune has deleted may be missing: a segment
                    // from the oldest backup's start on is a loss.
                    if first_kept_segno(&repo, &bin).is_some_and(|kept| name_segno(&name) >= kept) {
                        wrong.push(format!("{name}: not found"));
                    }
                    next = name;
                }
            }
            (outcomes, wrong)
        })
    };

    // The storm.
    let started = Instant::now();
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
    let mut outcomes = maintenance.join().unwrap();
    let (recovery_outcomes, wrong) = recovery.join().unwrap();
    outcomes.extend(recovery_outcomes);

    let proof = p.prove(Some(&storm_spool));
    let nothing_lost = proof.nothing_lost() && wrong.is_empty();
    report(&format!(
        "## 1. kill -9 storm, {} repository\n\n\
         Seed {seed}. pgbench (scale 4, 2 clients) on PostgreSQL with 1 MiB segments, archiving \
         through `walvault push` (push-ahead on); backup, prune --keep-last 3 and verify in turn \
         beside it; a standby fetching each archived segment in order (prefetch on), and restores \
         of the newest backup; every 50-300 ms one running walvault process killed with SIGKILL.\n\n\
         | figure | value |\n|---|---|\n\
         | storm length | {:.0} s |\n| kills | {} ({}) |\n| most walvault processes at once | {seen} |\n\
         | runs during the storm (verb exit: count) | {} |\n\
         | segments a fetch handed over wrong, or found missing though prune keeps them, during the storm | {} |\n\
         {}\n{}\
         Verdict: **{}**\n",
        backend.name(),
        storm.as_secs_f64(),
        kills.load(Ordering::Relaxed),
        killed_by_verb
            .lock()
            .unwrap()
            .iter()
            .map(|(v, n)| format!("{v} {n}"))
            .collect::<Vec<_>>()
            .join(", "),
        outcomes_line(&outcomes),
        wrong.len(),
        proof.rows(),
        proof.losses(),
        match nothing_lost {
            true => "nothing lost",
            false => "LOSS OR DAMAGE",
        }
    ));
    assert!(
        wrong.is_empty(),
        "fetch handed over wrong bytes or none: {wrong:?}"
    );
    proof.assert_nothing_lost();
}
