//! Operating the archive over time with a real PostgreSQL 15: prune by policy
//! (also while the server keeps archiving), verify, status and drill.

mod common;

use common::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Every file under `dir` with its content: "byte for byte" comparisons.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    walkdir::WalkDir::new(dir)
        .into_iter()
        .map(|e| e.unwrap())
        .filter(|e| e.file_type().is_file())
        .map(|e| (e.path().to_path_buf(), std::fs::read(e.path()).unwrap()))
        .collect()
}

/// Segment names stored in a filesystem-backed repository directory.
fn stored_segments(repo_dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = snapshot(&repo_dir.join("wal"))
        .keys()
        .filter_map(|p| {
            p.file_name()?
                .to_str()?
                .strip_suffix(".zst")
                .map(str::to_string)
        })
        .filter(|n| n.len() == 24)
        .collect();
    names.sort();
    names
}

fn walvault(s: &Setup, args: &[&str]) -> std::process::Output {
    s.repo
        .walvault_as_postgres(&s.bin)
        .args(args)
        .output()
        .unwrap()
}

fn ok(s: &Setup, args: &[&str]) -> String {
    let out = walvault(s, args);
    assert!(
        out.status.success(),
        "walvault {args:?}: {}",
        describe(&out)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Three backups with a batch of rows before each and one after.
fn three_backups(s: &Setup) -> Vec<String> {
    let p = &s.primary;
    // No autovacuum on t: its WAL (more than a 1 MiB segment after 80 000
    // rows) would make the archiver push while a test compares snapshots of
    // the repository.
    p.sql("CREATE TABLE t (batch int, id int) WITH (autovacuum_enabled = false)");
    let mut ids = vec![];
    for batch in 1..=3 {
        p.sql(&format!(
            "INSERT INTO t SELECT {batch}, g FROM generate_series(1, 20000) g"
        ));
        p.switch_wal();
        ids.push(s.backup());
        std::thread::sleep(Duration::from_millis(1100)); // ids have one-second resolution
    }
    p.sql("INSERT INTO t SELECT 4, g FROM generate_series(1, 20000) g");
    let last = p.switch_wal();
    p.wait_archived(&last);
    ids
}

fn start_segment_of(s: &Setup, id: &str) -> String {
    let list = s.list_json();
    let b = list
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["id"] == id)
        .unwrap();
    let lsn = b["start_lsn"].as_str().unwrap().to_string();
    s.primary
        .sql(&format!("SELECT pg_walfile_name('{lsn}'::pg_lsn)"))
}

fn prune_keep_last(repo_for: &dyn Fn(&Path) -> RepoTarget, repo_files: &dyn Fn(&Setup) -> PathBuf) {
    let s = setup(repo_for);
    let ids = three_backups(&s);
    let before = snapshot(&repo_files(&s));

    let out = ok(&s, &["prune", "--keep-last", "1", "--dry-run"]);
    assert!(out.contains("would delete 2 backups"), "{out}");
    assert!(out.contains("would delete wal/"), "{out}");
    assert_eq!(
        snapshot(&repo_files(&s)),
        before,
        "--dry-run changed the repository"
    );

    let out = ok(&s, &["prune", "--keep-last", "1"]);
    assert!(out.starts_with("prune: deleted 2 backups"), "{out}");
    let list = s.list_json();
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert_eq!(list[0]["id"], ids[2].as_str());
    // `--quiet` for cron: nothing on success.
    let out = walvault(&s, &["-q", "prune", "--keep-last", "1"]);
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "{}",
        describe(&out)
    );

    // Nothing before the kept backup's start survives, the rest is intact.
    let after = snapshot(&repo_files(&s));
    let start = start_segment_of(&s, &ids[2]);
    for path in before.keys() {
        let name = path.file_name().unwrap().to_str().unwrap();
        let Some(seg) = name.strip_suffix(".zst").filter(|n| n.len() == 24) else {
            continue;
        };
        assert_eq!(
            after.contains_key(path),
            seg >= start.as_str(),
            "{seg} (kept backup starts at {start})"
        );
    }
    ok(&s, &["verify"]);
    let restored = s.restore_and_start("latest", &[]);
    restored.wait_promoted();
    assert_eq!(Setup::batches(&restored), "1:20000 2:20000 3:20000 4:20000");
}

#[test]
fn fs_prune_keep_last_one() {
    prune_keep_last(&|root| RepoTarget::local(&root.join("repo")), &|s| {
        s.root().join("repo")
    });
}

#[test]
fn s3_prune_keep_last_one() {
    let s3 = S3Server::start();
    let data = s3.data.path().join(&s3.bucket).join("prune");
    prune_keep_last(&|_| s3.target("prune"), &|_| data.clone());
}

#[test]
fn prune_deletes_what_killed_writes_left_and_nothing_being_written() {
    let s = setup(&|root| RepoTarget::local(&root.join("repo")));
    let id = s.backup();
    let start = start_segment_of(&s, &id);
    let repo = s.root().join("repo");
    let files = snapshot(&repo);
    let beside = |suffix: &str, n: u32| {
        let (path, _) = files
            .iter()
            .rev()
            .find(|(p, _)| p.to_str().unwrap().ends_with(suffix))
            .unwrap_or_else(|| panic!("no {suffix} file in {files:?}"));
        let mut name = path.clone().into_os_string();
        name.push(format!("#{n}"));
        PathBuf::from(name)
    };
    // What a push and a pack upload killed an hour ago left, and a push's
    // staged file being written right now.
    let two_hours_ago = std::time::SystemTime::now() - Duration::from_secs(7200);
    let old_push = beside(".zst", 4_242_000);
    let old_pack = beside(".pack", 77);
    let live_push = beside(".zst", 4_242_001);
    for (path, modified) in [
        (&old_push, Some(two_hours_ago)),
        (&old_pack, Some(two_hours_ago)),
        (&live_push, None),
    ] {
        let f = std::fs::File::create(path).unwrap();
        f.set_len(1 << 20).unwrap();
        if let Some(t) = modified {
            f.set_modified(t).unwrap();
        }
        give_to_postgres(path);
    }

    // A repository at the root of its own filesystem has a lost+found only
    // root may read; prune, run as postgres, must not trip over it.
    let lost_found = repo.join("lost+found");
    std::fs::create_dir(&lost_found).unwrap();
    std::fs::set_permissions(
        &lost_found,
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .unwrap();

    let out = ok(&s, &["prune", "--keep-last", "1", "--dry-run"]);
    for path in [&old_push, &old_pack] {
        let line = format!(
            "would delete {} (left by an interrupted write)",
            path.display()
        );
        assert!(out.contains(&line), "{line} in {out}");
        assert!(path.exists(), "--dry-run deleted {}", path.display());
    }
    assert!(!out.contains(live_push.to_str().unwrap()), "{out}");

    let out = ok(&s, &["prune", "--keep-last", "1"]);
    assert!(out.contains(", 2 files of interrupted writes;"), "{out}");
    assert!(!old_push.exists() && !old_pack.exists(), "{out}");
    assert!(
        live_push.exists(),
        "prune deleted a staged file being written"
    );
    // The backup and the WAL it needs are untouched.
    let after = snapshot(&repo);
    for (path, bytes) in &files {
        let name = path.file_name().unwrap().to_str().unwrap();
        if name
            .strip_suffix(".zst")
            .is_some_and(|seg| seg.len() == 24 && seg < start.as_str())
        {
            continue;
        }
        assert_eq!(after.get(path), Some(bytes), "{} changed", path.display());
    }
    ok(&s, &["verify"]);
}

#[test]
fn keep_wal_within_keeps_older_backups_restorable() {
    let s = setup(&|root| RepoTarget::local(&root.join("repo")));
    let ids = three_backups(&s);
    let before = stored_segments(&s.root().join("repo"));
    std::thread::sleep(Duration::from_secs(2));
    // Every backup is older than the window: PITR only from the newest on.
    let out = ok(&s, &["prune", "--keep-wal-within", "1s"]);
    assert!(out.contains("deleted 0 backups"), "{out}");
    let after = stored_segments(&s.root().join("repo"));
    assert!(after.len() < before.len(), "nothing trimmed: {after:?}");
    assert_eq!(s.list_json().as_array().unwrap().len(), 3);
    // Trimming on purpose is not a problem for verify.
    ok(&s, &["verify"]);

    // The oldest backup still reaches its consistency point...
    let oldest = s.restore_and_start("oldest", &["--backup", &ids[0], "--immediate"]);
    oldest.wait_promoted();
    assert_eq!(Setup::batches(&oldest), "1:20000");
    drop(oldest);
    // ...and the newest still replays to the end.
    let newest = s.restore_and_start("newest", &[]);
    newest.wait_promoted();
    assert_eq!(Setup::batches(&newest), "1:20000 2:20000 3:20000 4:20000");
}

#[test]
fn prune_beside_a_live_archiver_deletes_nothing_it_pushes() {
    let dir = scratch();
    let root = dir.path().to_path_buf();
    let keep = root.join("keep");
    std::fs::create_dir(&keep).unwrap();
    give_to_postgres(&keep);
    // Keep PostgreSQL's own copy of each file it archives, to check against.
    let s = setup(&|r| RepoTarget::local(&r.join("repo")));
    s.primary.append_conf(&format!(
        "archive_command = 'cp %p {}/%f && {}'",
        keep.display(),
        s.repo.push_command(&s.bin)
    ));
    s.primary.sql("SELECT pg_reload_conf()");
    s.primary.sql("CREATE TABLE t (id int)");
    s.backup();
    std::thread::sleep(Duration::from_millis(1100));
    let newest = s.backup();
    let start = start_segment_of(&s, &newest);

    let writer = {
        let psql = s.primary.psql_command();
        std::thread::spawn(move || {
            let mut psql = psql;
            let sql =
                "INSERT INTO t SELECT g FROM generate_series(1, 2000) g; SELECT pg_switch_wal();"
                    .repeat(40);
            let out = psql.arg("-c").arg(sql).output().unwrap();
            assert!(out.status.success(), "{}", describe(&out));
        })
    };
    for _ in 0..5 {
        let out = walvault(&s, &["prune", "--keep-last", "1"]);
        // A prune that finds another one holding the lock is fine; nothing else is.
        assert!(
            out.status.success() || out.status.code() == Some(3),
            "{}",
            describe(&out)
        );
    }
    writer.join().unwrap();
    let last = s.primary.switch_wal();
    s.primary.wait_archived(&last);
    ok(&s, &["prune", "--keep-last", "1"]);

    let stored = stored_segments(&s.root().join("repo"));
    let mut pushed: Vec<String> = std::fs::read_dir(&keep)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.len() == 24 && n.as_str() >= start.as_str())
        .collect();
    pushed.sort();
    assert!(pushed.len() >= 40, "only {} segments pushed", pushed.len());
    for seg in &pushed {
        assert!(
            stored.contains(seg),
            "{seg} was pushed during prune and is gone"
        );
    }
    ok(&s, &["verify"]);
    drop(dir);
}

#[test]
fn verify_names_what_is_missing_or_damaged() {
    let s = setup(&|root| RepoTarget::local(&root.join("repo")));
    s.primary
        .sql("CREATE TABLE t AS SELECT g FROM generate_series(1, 50000) g");
    s.backup();
    for _ in 0..3 {
        s.primary
            .sql("INSERT INTO t SELECT g FROM generate_series(1, 1000) g");
        s.primary.switch_wal();
    }
    let last = s.primary.switch_wal();
    s.primary.wait_archived(&last);
    let out = ok(&s, &["verify"]);
    assert!(out.contains("no problems"), "{out}");
    let repo = s.root().join("repo");
    let segments = stored_segments(&repo);

    // A deleted middle segment.
    let middle = &segments[segments.len() - 2];
    let middle_path = repo
        .join("wal")
        .join(&middle[..16])
        .join(format!("{middle}.zst"));
    let saved = std::fs::read(&middle_path).unwrap();
    std::fs::remove_file(&middle_path).unwrap();
    let out = walvault(&s, &["verify"]);
    assert_eq!(out.status.code(), Some(4), "{}", describe(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("missing WAL segment {middle}")),
        "{text}"
    );
    std::fs::write(&middle_path, &saved).unwrap();

    // A flipped byte in a WAL object.
    let mut bytes = saved.clone();
    let at = bytes.len() / 2;
    bytes[at] ^= 1;
    std::fs::write(&middle_path, &bytes).unwrap();
    let out = walvault(&s, &["verify", "--json"]);
    assert_eq!(out.status.code(), Some(4), "{}", describe(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["ok"], false);
    let objects: Vec<&str> = report["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["object"].as_str().unwrap())
        .collect();
    assert_eq!(objects, [format!("wal/{}/{middle}.zst", &middle[..16])]);
    std::fs::write(&middle_path, &saved).unwrap();

    // A flipped byte in a pack.
    let pack = snapshot(&repo.join("packs")).into_keys().next().unwrap();
    let mut bytes = std::fs::read(&pack).unwrap();
    let at = bytes.len() / 3;
    bytes[at] ^= 1;
    std::fs::write(&pack, &bytes).unwrap();
    let out = walvault(&s, &["verify"]);
    assert_eq!(out.status.code(), Some(4), "{}", describe(&out));
    let name = pack.file_name().unwrap().to_str().unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(name),
        "{}",
        describe(&out)
    );
}

#[test]
fn status_window_matches_what_pitr_reaches() {
    let s = setup(&|root| RepoTarget::local(&root.join("repo")));
    let p = &s.primary;
    p.sql("CREATE TABLE t (batch int, id int)");
    p.sql("INSERT INTO t SELECT 1, g FROM generate_series(1, 1000) g");
    s.backup();
    p.sql("INSERT INTO t SELECT 2, g FROM generate_series(1, 1000) g");
    let last = p.switch_wal();
    p.wait_archived(&last);

    let status: serde_json::Value = serde_json::from_str(&ok(&s, &["status", "--json"])).unwrap();
    assert_eq!(status["backups"], 1);
    assert_eq!(
        status["system_identifier"].as_str().unwrap(),
        p.system_identifier()
    );
    assert_eq!(status["wal"][0]["missing"].as_array().unwrap().len(), 0);
    let window = &status["recoverable"][0];
    let from = window["from"].as_str().unwrap().to_string();
    let to = window["to"].as_str().unwrap().to_string();

    // The window's start: consistent, with the rows of the backup only.
    let at_start = s.restore_and_start("at-start", &["--time", &from]);
    at_start.wait_promoted();
    assert_eq!(Setup::batches(&at_start), "1:1000");
    drop(at_start);
    // Its end is the last archived transaction: a restore to the end of the
    // archive replays exactly up to it. (PostgreSQL stops a time target only
    // before a later transaction, so the end itself is reached without one.)
    assert_eq!(window["to_is_last_commit"], true, "{status}");
    let at_end = s.restore_and_start("at-end", &[]);
    at_end.wait_promoted();
    assert_eq!(Setup::batches(&at_end), "1:1000 2:1000");
    let replayed = at_end.sql("SELECT to_char(pg_last_xact_replay_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US')");
    let to_us = chrono::DateTime::parse_from_rfc3339(&to)
        .unwrap()
        .format("%Y-%m-%dT%H:%M:%S%.6f")
        .to_string();
    assert_eq!(replayed, to_us, "status says the window ends at {to}");
    drop(at_end);
    // Just before the start: refused, naming the earliest reachable time.
    let out = s.restore("before", &["--time", "2000-01-01T00:00:00Z"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("earliest reachable time"));

    let text = ok(&s, &["status", "--graph"]);
    assert!(
        text.contains("recoverable") && text.contains('B') && text.contains('='),
        "{text}"
    );
    assert_eq!(
        walvault(&s, &["status", "--max-age", "1h"]).status.code(),
        Some(0)
    );
    std::thread::sleep(Duration::from_secs(2));
    let out = walvault(&s, &["status", "--max-age", "1s"]);
    assert_eq!(out.status.code(), Some(6), "{}", describe(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("more than --max-age"));
}

#[test]
fn drill_proves_a_restore_and_fails_on_damage() {
    let s = setup(&|root| RepoTarget::local(&root.join("repo")));
    s.primary
        .sql("CREATE TABLE t AS SELECT g FROM generate_series(1, 12345) g");
    s.backup();
    s.primary.sql("INSERT INTO t VALUES (0)");
    let last = s.primary.switch_wal();
    s.primary.wait_archived(&last);
    let scratch_parent = s.root().join("drills");
    std::fs::create_dir(&scratch_parent).unwrap();
    give_to_postgres(&scratch_parent);
    let parent = scratch_parent.to_str().unwrap();

    let out = ok(
        &s,
        &[
            "drill",
            "--json",
            "--scratch",
            parent,
            "--check-sql",
            "SELECT count(*) FROM t",
        ],
    );
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["ok"], true, "{out}");
    assert_eq!(report["check_sql_result"], "12346");
    assert_eq!(report["segments_behind_archive"], 0, "{out}");
    assert!(report["ready_seconds"].as_f64().unwrap() > 0.0);
    assert_eq!(
        std::fs::read_dir(&scratch_parent).unwrap().count(),
        0,
        "scratch dir left behind"
    );

    let out = walvault(
        &s,
        &[
            "drill",
            "--scratch",
            parent,
            "--check-sql",
            "SELECT * FROM no_such_table",
        ],
    );
    assert!(!out.status.success(), "{}", describe(&out));

    let pack = snapshot(&s.root().join("repo/packs"))
        .into_keys()
        .next()
        .unwrap();
    let mut bytes = std::fs::read(&pack).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 1;
    std::fs::write(&pack, &bytes).unwrap();
    let out = walvault(&s, &["drill", "--json", "--scratch", parent]);
    assert_eq!(out.status.code(), Some(4), "{}", describe(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["ok"], false);
    assert!(report["error"].as_str().unwrap().contains("damaged"));
    assert_eq!(
        std::fs::read_dir(&scratch_parent).unwrap().count(),
        0,
        "scratch dir left behind"
    );
}

#[test]
fn a_held_lock_is_a_clear_error_and_a_stale_one_is_taken_over() {
    let s = setup(&|root| RepoTarget::local(&root.join("repo")));
    s.backup();
    let lock = s.root().join("repo/locks/repository.lock.json");
    std::fs::create_dir_all(lock.parent().unwrap()).unwrap();
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap()
        .trim()
        .to_string();
    let holder = |pid: u32| {
        serde_json::json!({"purpose": "prune", "host": host, "pid": pid,
            "since": "2026-01-01T00:00:00Z", "token": "x"})
        .to_string()
    };
    // Held by a live process (this test).
    std::fs::write(&lock, holder(std::process::id())).unwrap();
    give_to_postgres(s.root());
    let out = walvault(&s, &["prune", "--keep-last", "1"]);
    assert_eq!(out.status.code(), Some(3), "{}", describe(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("is locked by prune on host")
            && err.contains(&format!("pid {}", std::process::id())),
        "{err}"
    );
    assert!(lock.exists());
    // Held by a process that is gone: reported and taken over.
    std::fs::write(&lock, holder(4_000_000)).unwrap();
    let out = walvault(&s, &["prune", "--keep-last", "1"]);
    assert!(out.status.success(), "{}", describe(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("stale repository lock"));
    assert!(!lock.exists());
}
