//! Scenario 4 of the fault suite (issue #12): jobs that collide. Under
//! pgbench load, with push and its push-ahead worker archiving, backups,
//! two prunes at once, a prune from a second "host" (another hostname and
//! pid namespace) and verifies run together in bounded loops. Afterwards
//! nothing PostgreSQL archived is missing, verify is clean and every kept
//! backup restores exactly; meanwhile no job failed other than by finding
//! the repository's lock held.
//!
//! `make test` runs a short version on each backend; `make chaos` the long
//! one, which writes its figures into docs/reliability.md.

#[path = "common/archiving.rs"]
mod archiving;
mod common;

use archiving::*;
use common::*;
use std::process::{Command, Output};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// How long the long version collides, in seconds.
fn chaos_seconds() -> u64 {
    std::env::var("WALVAULT_CHAOS_COLLIDE_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(120)
}

#[test]
fn collisions_filesystem_short() {
    collide(Backend::Filesystem, 10);
}

#[test]
fn collisions_s3_short() {
    collide(Backend::S3, 10);
}

#[test]
#[ignore = "the fault suite: make chaos"]
fn collisions_filesystem() {
    collide(Backend::Filesystem, chaos_seconds());
}

#[test]
#[ignore = "the fault suite: make chaos"]
fn collisions_s3() {
    collide(Backend::S3, chaos_seconds());
}

/// The hostname the second "host" runs under.
const OTHER_HOST: &str = "walvault-other-host";

fn collide(backend: Backend, seconds: u64) {
    if !is_root() {
        eprintln!("skipped: the second host's namespaces need root");
        return;
    }
    let dir = scratch();
    let root = dir.path().to_path_buf();
    let bin = install_binary(&root);
    let (repo, _s3) = backend.repository(&root);
    let mut p = ShadowedPrimary::start(&root, &bin, &repo);
    let out = p.backup_command(60).output().unwrap();
    assert!(out.status.success(), "first backup: {}", describe(&out));

    let stop = Arc::new(AtomicBool::new(false));
    let mut load = p.start_load();
    // Each job in a loop of its own until the time is up.
    let job = |verb: &'static str, mut cmd: Command, pause_ms: u64| {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut outcomes = Outcomes::new();
            let mut unexpected: Vec<String> = vec![];
            for _ in 0..100_000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let out = cmd.output().unwrap();
                count_outcome(&mut outcomes, verb, &out);
                if !acceptable(&out) {
                    unexpected.push(format!("{verb}: {}", describe(&out).replace('\n', " ")));
                }
                std::thread::sleep(Duration::from_millis(pause_ms));
            }
            (outcomes, unexpected)
        })
    };
    let prune = || {
        let mut c = repo.walvault_as_postgres(&bin);
        c.args(["prune", "--keep-last", "2"]);
        c
    };
    let mut verify = repo.walvault_as_postgres(&bin);
    verify.arg("verify");
    let jobs = vec![
        job("backup", p.backup_command(60), 300),
        job("prune", prune(), 100),
        job("prune", prune(), 100),
        job(
            "prune (other host)",
            other_host(&repo, &bin, &["prune", "--keep-last", "2"]),
            100,
        ),
        job("verify", verify, 200),
    ];
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(seconds) {
        std::thread::sleep(Duration::from_millis(200));
    }
    stop.store(true, Ordering::Relaxed);
    let _ = load.kill();
    let _ = load.wait();
    let mut outcomes = Outcomes::new();
    let mut unexpected = vec![];
    for j in jobs {
        let (o, u) = j.join().unwrap();
        for (k, n) in o {
            *outcomes.entry(k).or_default() += n;
        }
        unexpected.extend(u);
    }
    let elapsed = started.elapsed();

    let proof = p.prove(None);
    let verdict = proof.nothing_lost() && unexpected.is_empty();
    report(&format!(
        "## 4. Collisions, {} repository\n\n\
         pgbench (scale 4, 2 clients) on PostgreSQL with 1 MiB segments, archiving through \
         `walvault push` (push-ahead on), while in loops of their own: backups, two `prune \
         --keep-last 2` at once, a third prune from a second host (hostname {OTHER_HOST} in \
         pid, UTS and mount namespaces of its own) and verify.\n\n\
         | figure | value |\n|---|---|\n\
         | collision length | {:.0} s |\n\
         | runs (verb exit: count; 3 is \"the repository's lock is held\") | {} |\n\
         | runs that failed otherwise | {} |\n\
         {}\n{}\
         Verdict: **{}**\n",
        backend.name(),
        elapsed.as_secs_f64(),
        outcomes_line(&outcomes),
        unexpected.len(),
        proof.rows(),
        proof.losses(),
        match verdict {
            true => "nothing lost",
            false => "LOSS OR DAMAGE",
        }
    ));
    assert!(unexpected.is_empty(), "jobs failed: {unexpected:#?}");
    // Every job ran, and each prune got the lock at least once.
    for verb in ["backup", "prune", "prune (other host)", "verify"] {
        assert!(
            outcomes.contains_key(&format!("{verb} 0")),
            "{verb} never succeeded: {outcomes:?}"
        );
    }
    proof.assert_nothing_lost();
}

/// A job may fail only by finding the lock held (exit 3, "try again").
fn acceptable(out: &Output) -> bool {
    matches!(out.status.code(), Some(0 | 3))
}

/// `walvault ARGS` as the postgres OS user on a second "host": a hostname,
/// pids and /proc of its own, so that nothing it leaves in the repository
/// can be judged by this host's process table.
fn other_host(repo: &RepoTarget, bin: &std::path::Path, args: &[&str]) -> Command {
    let mut walvault = vec!["exec runuser -u postgres -- env".to_string()];
    for (k, v) in &repo.env {
        walvault.push(format!("{k}={v}"));
    }
    walvault.push(format!("{} --repo {}", bin.display(), repo.url));
    walvault.extend(args.iter().map(|a| a.to_string()));
    let mut c = Command::new("unshare");
    c.args(["--uts", "--pid", "--fork", "--mount-proc", "sh", "-c"])
        .arg(format!("hostname {OTHER_HOST} && {}", walvault.join(" ")));
    c
}
