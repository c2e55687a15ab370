//! backup, list and restore with a real PostgreSQL 15: point-in-time
//! recovery by time, LSN, name and to the end of the archive; a standby; dedup;
//! and refusals of damaged or malicious repositories. On a filesystem and on S3.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

fn wait_until(what: &str, server: &PgServer, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !f() {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; log:\n{}",
            server.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn point_in_time_recovery(repo_for: &dyn Fn(&Path) -> RepoTarget) {
    let s = setup(repo_for);
    let p = &s.primary;
    p.sql("CREATE TABLE t (batch int, id int)");
    p.sql("INSERT INTO t SELECT 1, g FROM generate_series(1, 1000) g");
    let backup_id = s.backup();

    p.sql("INSERT INTO t SELECT 2, g FROM generate_series(1, 1000) g");
    std::thread::sleep(Duration::from_millis(300));
    let between_2_and_3 = p.sql("SELECT clock_timestamp()");
    std::thread::sleep(Duration::from_millis(300));
    let xid_3 = p.sql(
        "WITH ins AS (INSERT INTO t SELECT 3, g FROM generate_series(1, 1000) g RETURNING 1) \
         SELECT txid_current() FROM ins LIMIT 1",
    );
    p.sql("SELECT pg_create_restore_point('after_3')");
    let lsn_after_3 = p.sql("SELECT pg_current_wal_lsn()");
    p.sql("INSERT INTO t SELECT 4, g FROM generate_series(1, 1000) g");
    let last = p.switch_wal();
    p.wait_archived(&last);

    let list = s.list_json();
    assert_eq!(list[0]["id"], backup_id.as_str());

    // By time, between two batches: exactly the rows committed before it.
    let by_time = s.restore_and_start("by-time", &["--time", &between_2_and_3]);
    by_time.wait_promoted();
    assert_eq!(Setup::batches(&by_time), "1:1000 2:1000");
    // Promoted onto a new timeline.
    assert_eq!(
        by_time.sql("SELECT substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8)"),
        "00000002"
    );
    drop(by_time);

    let by_name = s.restore_and_start("by-name", &["--name", "after_3"]);
    by_name.wait_promoted();
    assert_eq!(Setup::batches(&by_name), "1:1000 2:1000 3:1000");
    drop(by_name);

    let by_xid = s.restore_and_start("by-xid", &["--xid", &xid_3]);
    by_xid.wait_promoted();
    assert_eq!(Setup::batches(&by_xid), "1:1000 2:1000 3:1000");
    drop(by_xid);

    let by_lsn = s.restore_and_start("by-lsn", &["--lsn", &lsn_after_3]);
    by_lsn.wait_promoted();
    assert_eq!(Setup::batches(&by_lsn), "1:1000 2:1000 3:1000");
    drop(by_lsn);

    let latest = s.restore_and_start("latest", &["--backup", "latest"]);
    latest.wait_promoted();
    assert_eq!(Setup::batches(&latest), "1:1000 2:1000 3:1000 4:1000");
    let conf = std::fs::read_to_string(s.root().join("latest/data/postgresql.auto.conf")).unwrap();
    assert!(
        conf.contains("restore_command") && conf.contains("recovery_target_timeline = 'latest'"),
        "{conf}"
    );
    drop(latest);

    // A target before every backup names the earliest reachable time.
    let out = s.restore("too-early", &["--time", "2000-01-01 00:00:00+00"]);
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("earliest reachable time is"),
        "{}",
        describe(&out)
    );
    assert!(!s.root().join("too-early/data").exists());
}

#[test]
fn fs_point_in_time_recovery() {
    point_in_time_recovery(&|root| RepoTarget::local(&root.join("repo")));
}

#[test]
fn s3_point_in_time_recovery() {
    let s3 = S3Server::start();
    point_in_time_recovery(&|_| s3.target("pitr"));
}

#[test]
fn standby_follows_the_primary() {
    let s = setup(&|root| RepoTarget::local(&root.join("repo")));
    s.primary.sql("CREATE TABLE t (batch int, id int)");
    s.primary
        .sql("INSERT INTO t SELECT 1, g FROM generate_series(1, 100) g");
    s.backup();
    let conninfo = format!(
        "host={} port=5432 user=postgres",
        s.primary.socket_dir.display()
    );
    let standby = s.restore_and_start("standby", &["--standby", "--primary-conninfo", &conninfo]);
    assert!(s.root().join("standby/data/standby.signal").exists());
    assert_eq!(standby.sql("SELECT pg_is_in_recovery()"), "t");
    s.primary.sql("INSERT INTO t VALUES (2, 42)");
    wait_until("the row to reach the standby", &standby, || {
        standby.sql("SELECT count(*) FROM t WHERE batch = 2") == "1"
    });
    assert_eq!(standby.sql("SELECT pg_is_in_recovery()"), "t");
}

#[test]
fn second_backup_of_unchanged_database_stores_little() {
    let s = setup(&|root| RepoTarget::local(&root.join("repo")));
    s.primary
        .sql("CREATE TABLE big AS SELECT g, md5(g::text) FROM generate_series(1, 200000) g");
    s.primary.sql("CHECKPOINT");
    s.backup();
    std::thread::sleep(Duration::from_millis(1100)); // backup ids have one-second resolution
    s.backup();
    let list = s.list_json();
    let first = list[0]["stored"].as_u64().unwrap();
    let second = list[1]["stored"].as_u64().unwrap();
    assert!(
        second * 20 < first,
        "second backup stored {second} bytes, first {first}"
    );
    // Both restore.
    let out = s.restore("second", &["--backup", list[1]["id"].as_str().unwrap()]);
    assert!(out.status.success(), "{}", describe(&out));
}

#[test]
fn damaged_pack_fails_the_restore_naming_the_file() {
    let s = setup(&|root| RepoTarget::local(&root.join("repo")));
    s.primary
        .sql("CREATE TABLE t AS SELECT g FROM generate_series(1, 10000) g");
    s.backup();
    let packs: Vec<PathBuf> = walkdir::WalkDir::new(s.root().join("repo/packs"))
        .into_iter()
        .map(|e| e.unwrap().into_path())
        .filter(|p| p.extension().is_some_and(|e| e == "pack"))
        .collect();
    assert!(!packs.is_empty());
    for pack in &packs {
        let mut bytes = std::fs::read(pack).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0x40;
        std::fs::write(pack, bytes).unwrap();
    }
    let out = s.restore("damaged", &[]);
    assert_eq!(out.status.code(), Some(4), "{}", describe(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("is damaged in the repository") && err.contains("do not start it"),
        "{err}"
    );
    assert!(
        !s.root().join("damaged/data/backup_label").exists(),
        "a failed restore looks complete"
    );
}

#[test]
fn malicious_manifest_is_refused_before_anything_is_written() {
    let s = setup(&|root| RepoTarget::local(&root.join("repo")));
    let id = s.backup();
    let key = s
        .root()
        .join(format!("repo/backups/{id}/manifest.json.zst"));
    let (_, json) = walvault::format::object::decode(&std::fs::read(&key).unwrap()).unwrap();
    for (n, evil) in [
        "../../escaped",
        "/tmp/walvault-escaped-absolute",
        "base/../../../escaped",
    ]
    .iter()
    .enumerate()
    {
        let mut m: serde_json::Value = serde_json::from_slice(&json).unwrap();
        m["files"][0]["path"] = serde_json::Value::from(*evil);
        let forged_id = format!("2099010{}T000000Z", n + 1);
        m["id"] = serde_json::Value::from(forged_id.clone());
        let dir = s.root().join(format!("repo/backups/{forged_id}"));
        std::fs::create_dir_all(&dir).unwrap();
        let (_, obj) =
            walvault::format::object::encode(&serde_json::to_vec(&m).unwrap(), 3).unwrap();
        std::fs::write(dir.join("manifest.json.zst"), obj).unwrap();
        let target = s.root().join(format!("evil{n}"));
        give_to_postgres(s.root());
        let out = s.restore(&format!("evil{n}"), &["--backup", &forged_id]);
        assert_eq!(out.status.code(), Some(4), "{evil}: {}", describe(&out));
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("leaves the data directory"),
            "{}",
            describe(&out)
        );
        assert!(
            !target.join("data").exists(),
            "restore wrote into the target"
        );
        assert!(
            !s.root().join("escaped").exists()
                && !Path::new("/tmp/walvault-escaped-absolute").exists()
        );
    }
}

#[test]
fn restore_refusals() {
    let s = setup(&|root| RepoTarget::local(&root.join("repo")));
    s.backup();
    let busy = s.root().join("busy/data");
    std::fs::create_dir_all(&busy).unwrap();
    std::fs::write(busy.join("keep-me"), b"precious").unwrap();
    give_to_postgres(s.root());
    let out = s.restore("busy", &[]);
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not empty"));
    assert_eq!(std::fs::read(busy.join("keep-me")).unwrap(), b"precious");

    let out = s.restore("nozone", &["--time", "2026-11-24 12:00:00"]);
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no time zone"));

    let out = s.restore("nobackup", &["--backup", "20000101T000000Z"]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
}

/// A cluster that was itself restored by walvault carries recovery settings
/// in its postgresql.auto.conf; a backup of it must still restore cleanly.
#[test]
fn backup_of_a_restored_cluster_restores_to_latest() {
    let s = setup(&|root| RepoTarget::local(&root.join("repo")));
    s.primary.sql("CREATE TABLE t (batch int, id int)");
    s.primary
        .sql("INSERT INTO t SELECT 1, g FROM generate_series(1, 100) g");
    s.backup();
    let lsn = s.primary.sql("SELECT pg_current_wal_lsn()");
    s.primary
        .sql("INSERT INTO t SELECT 2, g FROM generate_series(1, 100) g");
    let last = s.primary.switch_wal();
    s.primary.wait_archived(&last);

    // Restore to an LSN, and run the result as a new primary with its own repository.
    let out = s.restore("second", &["--lsn", &lsn]);
    assert!(out.status.success(), "{}", describe(&out));
    let repo2 = RepoTarget::local(&s.root().join("repo2"));
    let dir = s.root().join("second");
    let mut second = PgServer::existing(&dir, &dir.join("data"), vec![]);
    second.append_conf(&format!(
        "archive_mode = on\narchive_command = '{}'",
        repo2.push_command(&s.bin)
    ));
    second.start();
    second.wait_promoted();
    assert_eq!(Setup::batches(&second), "1:100");
    let out = repo2
        .walvault_as_postgres(&s.bin)
        .envs(second.libpq_env())
        .args(["backup", "--archive-timeout", "60"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", describe(&out));
    second.sql("INSERT INTO t SELECT 3, g FROM generate_series(1, 100) g");
    let last = second.switch_wal();
    second.wait_archived(&last);
    second.stop();

    let out = repo2
        .walvault_as_postgres(&s.bin)
        .args(["restore", "--pgdata"])
        .arg(s.root().join("third/data"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", describe(&out));
    let conf = std::fs::read_to_string(s.root().join("third/data/postgresql.auto.conf")).unwrap();
    assert!(
        !conf.contains("recovery_target_lsn"),
        "old target kept:\n{conf}"
    );
    let dir = s.root().join("third");
    let mut third = PgServer::existing(&dir, &dir.join("data"), vec![]);
    third.append_conf("archive_mode = off");
    third.start();
    third.wait_promoted();
    assert_eq!(Setup::batches(&third), "1:100 3:100");
}

/// A restore point between two backups: the restore starts from a backup
/// old enough to reach it.
#[test]
fn named_target_between_backups() {
    let s = setup(&|root| RepoTarget::local(&root.join("repo")));
    s.primary.sql("CREATE TABLE t (batch int, id int)");
    s.primary
        .sql("INSERT INTO t SELECT 1, g FROM generate_series(1, 100) g");
    s.backup();
    s.primary.sql("SELECT pg_create_restore_point('before_2')");
    s.primary
        .sql("INSERT INTO t SELECT 2, g FROM generate_series(1, 100) g");
    std::thread::sleep(Duration::from_millis(1100));
    s.backup();
    let last = s.primary.switch_wal();
    s.primary.wait_archived(&last);
    let restored = s.restore_and_start("named", &["--name", "before_2"]);
    restored.wait_promoted();
    assert_eq!(Setup::batches(&restored), "1:100");
}

/// Tablespaces are backed up through pg_tblspc and restored where asked.
#[test]
fn tablespace_round_trip() {
    let s = setup(&|root| RepoTarget::local(&root.join("repo")));
    let ts = s.root().join("ts-original");
    std::fs::create_dir(&ts).unwrap();
    give_to_postgres(&ts);
    s.primary.sql(&format!(
        "CREATE TABLESPACE extra LOCATION '{}'",
        ts.display()
    ));
    s.primary
        .sql("CREATE TABLE t (batch int, id int) TABLESPACE extra");
    s.primary
        .sql("INSERT INTO t SELECT 1, g FROM generate_series(1, 5000) g");
    let oid = s
        .primary
        .sql("SELECT oid FROM pg_tablespace WHERE spcname = 'extra'");
    s.backup();
    let last = s.primary.switch_wal();
    s.primary.wait_archived(&last);

    let moved = s.root().join("ts-restored");
    let map = format!("{oid}={}", moved.display());
    let restored = s.restore_and_start("with-ts", &["--tablespace-map", &map]);
    restored.wait_promoted();
    assert_eq!(Setup::batches(&restored), "1:5000");
    let link = std::fs::read_link(s.root().join(format!("with-ts/data/pg_tblspc/{oid}"))).unwrap();
    assert_eq!(link, moved);
    assert!(
        std::fs::read_dir(&moved).unwrap().count() > 0,
        "nothing restored into the mapped location"
    );
}

#[test]
fn a_damaged_manifest_does_not_hide_the_others() {
    let s = setup(&|root| RepoTarget::local(&root.join("repo")));
    let good = s.backup();
    let bad_dir = s.root().join("repo/backups/20200101T000000Z");
    std::fs::create_dir_all(&bad_dir).unwrap();
    std::fs::write(bad_dir.join("manifest.json.zst"), b"not a manifest").unwrap();
    give_to_postgres(s.root());
    let list = s.list_json();
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert_eq!(list[0]["id"], good.as_str());
    let out = s.restore("good", &["--backup", &good]);
    assert!(out.status.success(), "{}", describe(&out));
    // verify names it.
    let out = s.repo.walvault(&s.bin).arg("verify").output().unwrap();
    assert_eq!(out.status.code(), Some(4), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("backups/20200101T000000Z/manifest.json.zst")
    );
}
