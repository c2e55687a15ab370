//! A restore whose archive cannot deliver a segment must stop recovery, not
//! promote without the rest of the WAL: PostgreSQL reads any restore_command
//! exit of 1..125 as "not in the archive" and ends archive recovery there.
//! With a real PostgreSQL 15: a damaged middle WAL object and a missing one
//! stop the restored server with FATAL, and nothing of a new timeline reaches
//! the repository; a standby rides out an S3 outage and catches up.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::{Duration, Instant, SystemTime};

/// A primary with a repository and a backup, then six batches
/// of rows, each in a segment of its own. Returns the segments, in order.
fn archive_six_batches(s: &Setup) -> Vec<String> {
    let p = &s.primary;
    p.sql("CREATE TABLE t (batch int, id int)");
    p.sql("INSERT INTO t SELECT 1, g FROM generate_series(1, 1000) g");
    s.backup();
    let mut segments = vec![];
    for batch in 2..=7 {
        p.sql(&format!(
            "INSERT INTO t SELECT {batch}, g FROM generate_series(1, 1000) g"
        ));
        segments.push(p.switch_wal());
    }
    p.wait_archived(segments.last().unwrap());
    segments
}

fn wal_object(repo: &Path, segment: &str) -> PathBuf {
    repo.join("wal")
        .join(&segment[..16])
        .join(format!("{segment}.zst"))
}

/// Every file under `dir`, relative to it.
fn files_under(dir: &Path) -> Vec<String> {
    walkdir::WalkDir::new(dir)
        .into_iter()
        .map(|e| e.unwrap())
        .filter(|e| e.file_type().is_file())
        .map(|e| {
            e.path()
                .strip_prefix(dir)
                .unwrap()
                .to_string_lossy()
                .into_owned()
        })
        .collect()
}

/// Stops (immediately) whatever a start left running, even when the test fails.
struct StopOnDrop(PathBuf);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        let _ = as_postgres(pg_bindir().join("pg_ctl"))
            .args(["-w", "-t", "60", "-m", "immediate", "-D"])
            .arg(&self.0)
            .arg("stop")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// Restores the newest backup to the end of the archive (unless restored
/// already) and starts it with the configuration it was backed up with
/// (archiving into the same repository, as a restored primary would).
/// Returns pg_ctl's output, the server log, and a guard that stops the
/// server if it did come up.
fn restore_latest_and_start(s: &Setup, name: &str) -> (Output, String, StopOnDrop) {
    if !s.root().join(name).join("data").exists() {
        let out = s.restore(name, &["--backup", "latest"]);
        assert!(out.status.success(), "restore: {}", describe(&out));
    }
    let dir = s.root().join(name);
    let data = dir.join("data");
    let sock = dir.join("sock");
    std::fs::create_dir_all(&sock).unwrap();
    give_to_postgres(&dir);
    let log = dir.join("server.log");
    let guard = StopOnDrop(data.clone());
    // The server's environment reaches restore_command (S3 settings).
    let mut pg_ctl = as_postgres("env");
    for (k, v) in &s.repo.env {
        pg_ctl.arg(format!("{k}={v}"));
    }
    let started = pg_ctl
        .arg(pg_bindir().join("pg_ctl"))
        .args(["-w", "-t", "120", "-D"])
        .arg(&data)
        .arg("-l")
        .arg(&log)
        .arg("-o")
        .arg(format!("-c unix_socket_directories={}", sock.display()))
        .arg("start")
        .output()
        .unwrap();
    // pg_ctl -w returns once the server is consistent, recovery still under
    // way: wait (bounded) for recovery to end, promoted or stopped.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains(PROMOTED) || text.contains(SHUT_DOWN) || !started.status.success() {
            return (started, text, guard);
        }
        assert!(Instant::now() < deadline, "recovery did not end: {text}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

const PROMOTED: &str = "database system is ready to accept connections";
const SHUT_DOWN: &str = "database system is shut down";

/// What every stopped recovery must show: the server shut down after the
/// startup process failed, the log has walvault's line and PostgreSQL's FATAL, no new timeline was
/// chosen, and nothing of timeline 2 reached the repository.
fn assert_recovery_stopped(started: &Output, log: &str, repo: &Path, walvault_says: &str) {
    assert!(
        log.contains("shutting down due to startup process failure"),
        "the restored server did not stop: {}\n{log}",
        describe(started)
    );
    assert!(log.contains(walvault_says), "{log}");
    assert!(log.contains("stopped on purpose"), "{log}");
    assert!(
        log.contains("FATAL:  could not restore file") && log.contains("exited with exit code 20"),
        "{log}"
    );
    for promoted in [
        "selected new timeline ID",
        "archive recovery complete",
        PROMOTED,
    ] {
        assert!(!log.contains(promoted), "{promoted}: {log}");
    }
    let on_timeline_2: Vec<String> = files_under(&repo.join("wal"))
        .into_iter()
        .filter(|f| f.contains("00000002"))
        .collect();
    assert!(on_timeline_2.is_empty(), "{on_timeline_2:?}");
}

#[test]
fn a_damaged_middle_wal_object_stops_recovery() {
    let s = setup(&|root| RepoTarget::local(&root.join("repo")));
    let repo = s.root().join("repo");
    let segments = archive_six_batches(&s);
    // Batch 4's segment: batches 2 and 3 replay, then the damage.
    let object = wal_object(&repo, &segments[2]);
    let mut bytes = std::fs::read(&object).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xFF;
    std::fs::write(&object, bytes).unwrap();

    let (started, log, _guard) = restore_latest_and_start(&s, "damaged");
    assert_recovery_stopped(&started, &log, &repo, "is damaged");
    assert!(log.contains(&segments[2]), "{log}");
}

#[test]
fn a_missing_middle_segment_stops_recovery() {
    let s = setup(&|root| RepoTarget::local(&root.join("repo")));
    let repo = s.root().join("repo");
    let segments = archive_six_batches(&s);
    std::fs::remove_file(wal_object(&repo, &segments[2])).unwrap();
    // An archive written a while ago (a fresh one gets a short grace for
    // segments pushed out of order).
    let an_hour_ago = SystemTime::now() - Duration::from_secs(3600);
    for f in files_under(&repo.join("wal")) {
        std::fs::File::options()
            .write(true)
            .open(repo.join("wal").join(f))
            .unwrap()
            .set_modified(an_hour_ago)
            .unwrap();
    }

    let (started, log, _guard) = restore_latest_and_start(&s, "gap");
    assert_recovery_stopped(&started, &log, &repo, "the archived WAL has a gap");
    // The line names the missing segment and the next one present.
    let line = log
        .lines()
        .find(|l| l.contains("has a gap"))
        .unwrap_or_default();
    assert!(
        line.contains(&segments[2]) && line.contains(&segments[3]),
        "{line}"
    );
}

/// Finding 1 of the review: a primary dies with its archiver behind (two
/// segments of timeline 1 never archived) and its streaming standby is
/// promoted, archiving the `.partial` of timeline 1 and timeline 2. A
/// restore of the older backup to latest asks for the first unarchived
/// segment by timeline 1's name, with no later segment of timeline 1
/// stored: it used to be "not in the archive", and the server promoted onto
/// timeline 3 without any of timeline 2.
#[test]
fn a_failover_with_the_archiver_behind_stops_recovery() {
    let s = setup(&|root| RepoTarget::local(&root.join("repo")));
    let repo = s.root().join("repo");
    let p = &s.primary;
    p.sql("CREATE TABLE t (batch int, id int)");
    p.sql("INSERT INTO t SELECT 1, g FROM generate_series(1, 1000) g");
    s.backup();
    p.sql("INSERT INTO t SELECT 2, g FROM generate_series(1, 1000) g");
    p.wait_archived(&p.switch_wal());

    // A streaming standby that archives once promoted (the backup's settings).
    let conninfo = format!(
        "host={} port={} user=postgres",
        p.socket_dir.display(),
        p.port
    );
    let out = s.restore("standby", &["--standby", "--primary-conninfo", &conninfo]);
    assert!(out.status.success(), "restore: {}", describe(&out));
    let dir = s.root().join("standby");
    let mut standby = PgServer::existing(&dir, &dir.join("data"), s.repo.env.clone());
    standby.start();
    let replayed = |server: &PgServer, batch: u32| {
        let deadline = Instant::now() + Duration::from_secs(120);
        while server.sql(&format!("SELECT count(*) FROM t WHERE batch = {batch}")) != "1000" {
            assert!(Instant::now() < deadline, "batch {batch}: {}", server.log());
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    replayed(&standby, 2);

    // The archiver falls behind: two segments are never archived.
    p.sql("ALTER SYSTEM SET archive_command = 'false'");
    p.sql("SELECT pg_reload_conf()");
    p.sql("INSERT INTO t SELECT 3, g FROM generate_series(1, 1000) g");
    let unarchived = p.switch_wal();
    p.sql("INSERT INTO t SELECT 4, g FROM generate_series(1, 1000) g");
    p.switch_wal();
    p.sql("INSERT INTO t SELECT 5, g FROM generate_series(1, 1000) g");
    replayed(&standby, 5);
    let out = as_postgres(pg_bindir().join("pg_ctl"))
        .args(["-w", "-t", "60", "-m", "immediate", "-D"])
        .arg(&p.data)
        .arg("stop")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", describe(&out));

    standby.sql("SELECT pg_promote()");
    standby.wait_promoted();
    standby.sql("INSERT INTO t SELECT 6, g FROM generate_series(1, 1000) g");
    standby.wait_archived(&standby.switch_wal());
    standby.stop();
    let stored = files_under(&repo.join("wal"));
    assert!(
        stored.iter().any(|f| f.ends_with(".partial.zst"))
            && stored.iter().any(|f| f.ends_with("00000002.history.zst"))
            && !stored.iter().any(|f| f.contains(&unarchived)),
        "{stored:?}"
    );
    let an_hour_ago = SystemTime::now() - Duration::from_secs(3600);
    for f in &stored {
        std::fs::File::options()
            .write(true)
            .open(repo.join("wal").join(f))
            .unwrap()
            .set_modified(an_hour_ago)
            .unwrap();
    }

    let (started, log, _guard) = restore_latest_and_start(&s, "after-failover");
    assert!(
        log.contains("shutting down due to startup process failure"),
        "the restored server did not stop: {}\n{log}",
        describe(&started)
    );
    let line = log
        .lines()
        .find(|l| l.contains("has a gap"))
        .unwrap_or_default();
    assert!(
        line.contains(&unarchived) && line.contains("stopped on purpose"),
        "{log}"
    );
    for promoted in [
        "selected new timeline ID",
        "archive recovery complete",
        PROMOTED,
    ] {
        assert!(!log.contains(promoted), "{promoted}: {log}");
    }
    let on_timeline_3: Vec<String> = files_under(&repo.join("wal"))
        .into_iter()
        .filter(|f| f.contains("00000003"))
        .collect();
    assert!(on_timeline_3.is_empty(), "{on_timeline_3:?}");
}

/// Waits (bounded) until the primary has archived `segment`, failures on
/// the way allowed (the store was down).
fn wait_archived_after_outage(primary: &PgServer, segment: &str) {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let last = primary.sql("SELECT coalesce(last_archived_wal, '') FROM pg_stat_archiver");
        if last.len() >= 24 && &last[..24] >= segment {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{segment} not archived after the outage; log:\n{}",
            primary.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_standby_rides_out_a_store_outage() {
    let mut s3 = S3Server::start();
    let s = setup(&|_| s3.target("repo"));
    let p = &s.primary;
    p.sql("CREATE TABLE t (batch int, id int)");
    p.sql("INSERT INTO t SELECT 1, g FROM generate_series(1, 1000) g");
    s.backup();
    // Archive-only standby: everything it gets comes through fetch.
    let standby = s.restore_and_start("standby", &["--standby"]);
    assert!(s.root().join("standby/data/standby.signal").exists());
    assert_eq!(Setup::batches(&standby), "1:1000");

    s3.stop();
    p.sql("INSERT INTO t SELECT 2, g FROM generate_series(1, 1000) g");
    let segment = p.switch_wal();
    // The standby asks for the next segment every 5 s; wait (bounded) until
    // a fetch has failed on the store, which must not stop the standby.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !standby.log().contains("walvault: error: cannot read") {
        assert!(
            Instant::now() < deadline,
            "no fetch failed during the outage; log:\n{}",
            standby.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(standby.sql("SELECT pg_is_in_recovery()"), "t");
    s3.restart();

    wait_archived_after_outage(p, &segment);
    let deadline = Instant::now() + Duration::from_secs(180);
    while Setup::batches(&standby) != "1:1000 2:1000" {
        assert!(
            Instant::now() < deadline,
            "the standby did not catch up; log:\n{}",
            standby.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(standby.sql("SELECT pg_is_in_recovery()"), "t");
    let log = standby.log();
    assert!(!log.contains("FATAL"), "{log}");
    assert!(!log.contains("selected new timeline ID"), "{log}");
}

const MIB: u32 = 1 << 20;

/// Runs `walvault fetch name pg_wal/RECOVERYXLOG` in `data`, as PostgreSQL
/// does (the data directory as working directory), without prefetch.
fn fetch_in(bin: &Path, repo: &str, data: &Path, name: &str) -> Output {
    std::process::Command::new(bin)
        .current_dir(data)
        .args(["--repo", repo, "fetch", "--prefetch", "0", name])
        .arg("pg_wal/RECOVERYXLOG")
        .output()
        .unwrap()
}

/// Without a server: the status of each outcome, by who calls fetch (the
/// signal file in the working directory).
#[test]
fn exit_statuses_follow_the_caller() {
    let dir = tempfile::tempdir().unwrap();
    let bin = install_binary(dir.path());
    let repo = dir.path().join("repo");
    let repo_url = repo.display().to_string();
    let source = dir.path().join("source");
    std::fs::create_dir_all(&source).unwrap();
    let segment = |n: u32| format!("0000000100000000{n:08X}");
    for n in [3, 4, 6] {
        let path = source.join(segment(n));
        std::fs::write(&path, synthetic_segment(&segment(n), 7, MIB, n as u8)).unwrap();
        let out = std::process::Command::new(&bin)
            .args(["--repo", &repo_url, "push", "--push-ahead", "0"])
            .arg(&path)
            .arg(segment(n))
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", describe(&out));
    }
    let damaged = wal_object(&repo, &segment(4));
    let mut bytes = std::fs::read(&damaged).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    std::fs::write(&damaged, bytes).unwrap();
    let an_hour_ago = SystemTime::now() - Duration::from_secs(3600);
    for f in files_under(&repo.join("wal")) {
        std::fs::File::options()
            .write(true)
            .open(repo.join("wal").join(f))
            .unwrap()
            .set_modified(an_hour_ago)
            .unwrap();
    }
    let gone = dir.path().join("gone");

    // (signal files, [delivered, damaged, gap, end of archive, history, no repository])
    let callers: [(&[&str], [i32; 6]); 4] = [
        (&[], [0, 4, 1, 1, 1, 2]),
        (&["recovery.signal"], [0, 204, 204, 1, 1, 202]),
        (&["standby.signal"], [0, 4, 1, 1, 1, 2]),
        (&["recovery.signal", "standby.signal"], [0, 4, 1, 1, 1, 2]),
    ];
    for (i, (signals, statuses)) in callers.iter().enumerate() {
        let data = dir.path().join(format!("data{i}"));
        std::fs::create_dir_all(data.join("pg_wal")).unwrap();
        for s in *signals {
            std::fs::write(data.join(s), b"").unwrap();
        }
        let outcomes = [
            fetch_in(&bin, &repo_url, &data, &segment(3)),
            fetch_in(&bin, &repo_url, &data, &segment(4)),
            fetch_in(&bin, &repo_url, &data, &segment(5)),
            fetch_in(&bin, &repo_url, &data, &segment(7)),
            fetch_in(&bin, &repo_url, &data, "00000002.history"),
            fetch_in(&bin, &gone.display().to_string(), &data, &segment(3)),
        ];
        for (out, status) in outcomes.iter().zip(statuses) {
            assert_eq!(
                out.status.code(),
                Some(*status),
                "{signals:?}: {}",
                describe(out)
            );
            let stderr = String::from_utf8_lossy(&out.stderr);
            // One line, or none for "not in the archive".
            assert_eq!(stderr.lines().count(), usize::from(*status > 1), "{stderr}");
            assert_eq!(
                stderr.contains("stopped on purpose"),
                *status > 125,
                "{stderr}"
            );
        }
        if statuses[2] > 125 {
            // The gap line names the missing segment and the next present.
            let stderr = String::from_utf8_lossy(&outcomes[2].stderr);
            assert!(
                stderr.contains(&segment(5)) && stderr.contains(&segment(6)),
                "{stderr}"
            );
        }
    }
}

/// Pushes synthetic segments `ns` of timeline 1 (1 MiB) into a local
/// repository at `repo` and dates every WAL object an hour back (no settling).
fn push_segments_an_hour_ago(bin: &Path, dir: &Path, repo: &Path, ns: &[u32]) {
    let segment = |n: u32| format!("0000000100000000{n:08X}");
    for &n in ns {
        let path = dir.join(segment(n));
        std::fs::write(&path, synthetic_segment(&segment(n), 7, MIB, n as u8)).unwrap();
        let out = std::process::Command::new(bin)
            .args([
                "--repo",
                &repo.display().to_string(),
                "push",
                "--push-ahead",
                "0",
            ])
            .arg(&path)
            .arg(segment(n))
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", describe(&out));
    }
    let an_hour_ago = SystemTime::now() - Duration::from_secs(3600);
    for f in files_under(&repo.join("wal")) {
        std::fs::File::options()
            .write(true)
            .open(repo.join("wal").join(f))
            .unwrap()
            .set_modified(an_hour_ago)
            .unwrap();
    }
}

/// PostgreSQL looks in pg_wal only after restore_command answered "not in
/// the archive": a hole the operator filled there gets that answer, and the
/// gap line says to do just that.
#[test]
fn a_hole_filled_in_pg_wal_is_left_to_postgresql() {
    let dir = tempfile::tempdir().unwrap();
    let bin = install_binary(dir.path());
    let repo = dir.path().join("repo");
    let repo_url = repo.display().to_string();
    push_segments_an_hour_ago(&bin, dir.path(), &repo, &[3, 4, 6]);
    let data = dir.path().join("data");
    let pg_wal = data.join("pg_wal");
    std::fs::create_dir_all(&pg_wal).unwrap();
    std::fs::write(data.join("recovery.signal"), b"").unwrap();
    let missing = "000000010000000000000005";

    let gap = fetch_in(&bin, &repo_url, &data, missing);
    assert_eq!(gap.status.code(), Some(204), "{}", describe(&gap));
    let stderr = String::from_utf8_lossy(&gap.stderr);
    assert!(
        stderr.contains(&format!("copy it into pg_wal as {missing}")),
        "{stderr}"
    );
    // Not a regular file: still a gap.
    std::fs::create_dir(pg_wal.join(missing)).unwrap();
    let gap = fetch_in(&bin, &repo_url, &data, missing);
    assert_eq!(gap.status.code(), Some(204), "{}", describe(&gap));
    std::fs::remove_dir(pg_wal.join(missing)).unwrap();

    let copy = synthetic_segment(missing, 7, MIB, 5);
    std::fs::write(pg_wal.join(missing), &copy).unwrap();
    let filled = fetch_in(&bin, &repo_url, &data, missing);
    assert_eq!(filled.status.code(), Some(1), "{}", describe(&filled));
    assert!(filled.stderr.is_empty(), "{}", describe(&filled));
    assert!(!pg_wal.join("RECOVERYXLOG").exists());
    assert_eq!(std::fs::read(pg_wal.join(missing)).unwrap(), copy);
}

/// Failures before fetch runs (a bad option, no repository, a bad URL) stop
/// archive recovery too, and elsewhere keep their status; a panic prints one
/// line.
#[test]
fn failures_before_fetch_runs_stop_archive_recovery() {
    let dir = tempfile::tempdir().unwrap();
    let bin = install_binary(dir.path());
    let name = "000000010000000000000005";
    let run = |data: &Path, words: &[&str]| {
        std::process::Command::new(&bin)
            .current_dir(data)
            .env_remove("WALVAULT_REPO")
            .args(words)
            .output()
            .unwrap()
    };
    let failures: [&[&str]; 3] = [
        &["fetch", name, "pg_wal/RECOVERYXLOG"],
        &[
            "--repo",
            "/nowhere",
            "fetch",
            "--bogus",
            name,
            "pg_wal/RECOVERYXLOG",
        ],
        &[
            "--repo",
            "relative/repo",
            "fetch",
            name,
            "pg_wal/RECOVERYXLOG",
        ],
    ];
    for (signals, status) in [(&["recovery.signal"][..], 202), (&[][..], 2)] {
        let data = dir.path().join(format!("data{status}"));
        std::fs::create_dir_all(data.join("pg_wal")).unwrap();
        for s in signals {
            std::fs::write(data.join(s), b"").unwrap();
        }
        for words in failures {
            let out = run(&data, words);
            assert_eq!(
                out.status.code(),
                Some(status),
                "{words:?}: {}",
                describe(&out)
            );
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(stderr.lines().count(), 1, "{stderr}");
            assert_eq!(
                stderr.contains("stopped on purpose"),
                status > 125,
                "{stderr}"
            );
        }
    }

    // A panic (the internal prefetch worker divides by its segment size):
    // one line, and the status it always had.
    let repo = dir.path().join("repo");
    push_segments_an_hour_ago(&bin, dir.path(), &repo, &[3]);
    let out = run(
        dir.path(),
        &[
            "--repo",
            &repo.display().to_string(),
            "fetch-ahead",
            "--spool",
            &dir.path().join("spool").display().to_string(),
            "--count",
            "1",
            "--segment-size",
            "0",
            "000000010000000000000003",
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(101), "{}", describe(&out));
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with("walvault: error: internal error, a bug in walvault: "),
        "{stderr}"
    );
}

/// Prefetching serves recovery only: without a signal file (a person, a
/// script, pg_rewind --restore-target-wal) fetch starts no worker.
#[test]
fn only_recovery_starts_a_prefetch_worker() {
    let dir = tempfile::tempdir().unwrap();
    let bin = install_binary(dir.path());
    let repo = dir.path().join("repo");
    push_segments_an_hour_ago(&bin, dir.path(), &repo, &[3, 4, 5]);
    for (signal, prefetches) in [(None, false), (Some("standby.signal"), true)] {
        let data = dir.path().join(format!("data-{prefetches}"));
        let pg_wal = data.join("pg_wal");
        std::fs::create_dir_all(&pg_wal).unwrap();
        if let Some(s) = signal {
            std::fs::write(data.join(s), b"").unwrap();
        }
        let out = std::process::Command::new(&bin)
            .current_dir(&data)
            .args(["--repo", &repo.display().to_string(), "fetch"])
            .args(["000000010000000000000003", "pg_wal/RECOVERYXLOG"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", describe(&out));
        assert!(pg_wal.join("RECOVERYXLOG").is_file());
        // A worker is started before fetch exits; its copies follow.
        let prefetched = pg_wal.join("walvault-spool").join("prefetch");
        let copies = || match prefetched.exists() {
            true => files_under(&prefetched),
            false => vec![],
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while prefetches && Instant::now() < deadline && copies().len() < 2 {
            std::thread::sleep(Duration::from_millis(100));
        }
        if prefetches {
            assert_eq!(copies().len(), 2, "{signal:?}: {:?}", copies());
        } else {
            std::thread::sleep(Duration::from_millis(500));
            assert!(!pg_wal.join("walvault-spool").exists(), "{signal:?}");
        }
    }
}

/// A fetch killed by a signal leaves its temporary in pg_wal; the next
/// fetch removes it, and only it.
#[test]
fn a_fetch_removes_what_killed_fetches_left_in_pg_wal() {
    let dir = tempfile::tempdir().unwrap();
    let bin = install_binary(dir.path());
    let repo = dir.path().join("repo");
    let repo_url = repo.display().to_string();
    let name = "000000010000000000000003";
    let segment = dir.path().join(name);
    let content = synthetic_segment(name, 7, MIB, 0);
    std::fs::write(&segment, &content).unwrap();
    let out = std::process::Command::new(&bin)
        .args(["--repo", &repo_url, "push", "--push-ahead", "0"])
        .arg(&segment)
        .arg(name)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", describe(&out));

    let data = dir.path().join("data");
    let pg_wal = data.join("pg_wal");
    std::fs::create_dir_all(&pg_wal).unwrap();
    std::fs::write(data.join("recovery.signal"), b"").unwrap();
    // What a fetch killed mid-write leaves: its temporary, named with a pid
    // that no longer exists.
    let mut reaped = std::process::Command::new("true").spawn().unwrap();
    let dead = reaped.id();
    reaped.wait().unwrap();
    let left = pg_wal.join(format!(".RECOVERYXLOG.walvault-{dead}.tmp"));
    std::fs::write(&left, vec![0u8; MIB as usize]).unwrap();
    let precious = dir.path().join("precious");
    std::fs::write(&precious, b"keep").unwrap();
    let link = pg_wal.join(format!(".LINK.walvault-{dead}.tmp"));
    std::os::unix::fs::symlink(&precious, &link).unwrap();
    let other = pg_wal.join("000000010000000000000002");
    std::fs::write(&other, b"wal").unwrap();

    let out = fetch_in(&bin, &repo_url, &data, name);
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(std::fs::read(pg_wal.join("RECOVERYXLOG")).unwrap(), content);
    assert!(!left.exists(), "the abandoned temporary is still there");
    assert!(link.symlink_metadata().is_ok());
    assert_eq!(std::fs::read(&precious).unwrap(), b"keep");
    assert_eq!(std::fs::read(&other).unwrap(), b"wal");
}

/// The gap check lists the store: the same answers from S3 (s3s-fs).
#[test]
fn s3_a_gap_stops_archive_recovery_and_the_end_does_not() {
    let dir = tempfile::tempdir().unwrap();
    let bin = install_binary(dir.path());
    let s3 = S3Server::start();
    let repo = s3.target("gap");
    let segment = |n: u32| format!("0000000100000000{n:08X}");
    for n in [3, 5] {
        let path = dir.path().join(segment(n));
        std::fs::write(&path, synthetic_segment(&segment(n), 7, MIB, n as u8)).unwrap();
        let out = repo
            .walvault(&bin)
            .args(["push", "--push-ahead", "0"])
            .arg(&path)
            .arg(segment(n))
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", describe(&out));
    }
    let an_hour_ago = SystemTime::now() - Duration::from_secs(3600);
    for n in [3, 5] {
        let object = s3.object_path("gap", &format!("wal/0000000100000000/{}.zst", segment(n)));
        std::fs::File::options()
            .write(true)
            .open(object)
            .unwrap()
            .set_modified(an_hour_ago)
            .unwrap();
    }
    let data = dir.path().join("data");
    std::fs::create_dir_all(data.join("pg_wal")).unwrap();
    std::fs::write(data.join("recovery.signal"), b"").unwrap();
    let fetch = |name: &str| {
        repo.walvault(&bin)
            .current_dir(&data)
            .args(["fetch", "--prefetch", "0", name, "pg_wal/RECOVERYXLOG"])
            .output()
            .unwrap()
    };
    let since = Instant::now();
    let gap = fetch(&segment(4));
    assert_eq!(gap.status.code(), Some(204), "{}", describe(&gap));
    let stderr = String::from_utf8_lossy(&gap.stderr);
    assert!(
        stderr.contains("has a gap") && stderr.contains(&segment(5)),
        "{stderr}"
    );
    // Stored an hour ago: no wait for out-of-order pushes to land.
    assert!(since.elapsed() < Duration::from_secs(20));
    let end = fetch(&segment(6));
    assert_eq!(end.status.code(), Some(1), "{}", describe(&end));
    assert!(end.stderr.is_empty(), "{}", describe(&end));
    assert!(fetch(&segment(5)).status.success());
}

/// The fault run of the issue, shortened: the S3 store goes down while a
/// restored server is halfway through the archive. Recovery stops (it used
/// to promote there, without the later batches); once the store is back,
/// starting again recovers it all.
#[test]
fn an_s3_outage_stops_archive_recovery_and_a_restart_finishes_it() {
    let mut s3 = S3Server::start();
    let s = setup(&|_| s3.target("repo"));
    let segments = archive_six_batches(&s);
    // Halfway: replay to the middle of batch 4's segment and shut down there.
    let seg = &segments[2];
    let log_no = u64::from_str_radix(&seg[8..16], 16).unwrap();
    let seg_no = u64::from_str_radix(&seg[16..24], 16).unwrap();
    let halfway = (log_no << 32) + seg_no * u64::from(MIB) + u64::from(MIB / 2);
    let lsn = format!("{:X}/{:X}", halfway >> 32, halfway & 0xFFFF_FFFF);
    let out = s.restore(
        "outage",
        &[
            "--backup",
            "latest",
            "--lsn",
            &lsn,
            "--target-action",
            "shutdown",
        ],
    );
    assert!(out.status.success(), "restore: {}", describe(&out));
    let dir = s.root().join("outage");
    let data = dir.join("data");
    let (_, log, guard) = restore_latest_and_start(&s, "outage");
    assert!(
        log.contains("recovery stopping after WAL location"),
        "{log}"
    );
    assert!(log.contains(SHUT_DOWN), "{log}");
    drop(guard);
    // The rest of the way to the end of the archive, with the store down.
    let auto = data.join("postgresql.auto.conf");
    let conf: String = std::fs::read_to_string(&auto)
        .unwrap()
        .lines()
        .filter(|l| {
            !l.starts_with("recovery_target_lsn") && !l.starts_with("recovery_target_action")
        })
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&auto, conf).unwrap();
    std::fs::remove_file(dir.join("server.log")).unwrap();
    s3.stop();
    let stored = s3.data.path().join(&s3.bucket).join("repo");
    let (started, log, guard) = restore_latest_and_start(&s, "outage");
    assert_recovery_stopped(&started, &log, &stored, "cannot read");
    drop(guard);

    s3.restart();
    let mut again = PgServer::existing(&dir, &data, s.repo.env.clone());
    again.append_conf("archive_mode = off");
    again.start();
    again.wait_promoted();
    assert_eq!(
        Setup::batches(&again),
        "1:1000 2:1000 3:1000 4:1000 5:1000 6:1000 7:1000"
    );
}
