//! Backups taken from a streaming standby (PostgreSQL 15): the standby's own
//! archiver pushes nothing (archive_mode = on), so the backup waits, bounded,
//! for the primary to archive the WAL it needs, then publishes; restored, it
//! holds exactly the rows the standby had.

mod common;

use common::*;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

#[test]
fn a_backup_from_a_standby_restores_exactly() {
    let s = setup(&|root| RepoTarget::local(&root.join("repo")));
    let p = &s.primary;
    p.sql("CREATE TABLE t (batch int, id int)");
    p.sql("INSERT INTO t SELECT 1, g FROM generate_series(1, 1000) g");
    s.backup();
    let conninfo = format!(
        "host={} port={} user=postgres",
        p.socket_dir.display(),
        p.port
    );
    let standby = s.restore_and_start("standby", &["--standby", "--primary-conninfo", &conninfo]);
    p.sql("INSERT INTO t SELECT 2, g FROM generate_series(1, 2000) g");
    let deadline = Instant::now() + Duration::from_secs(60);
    while standby.sql("SELECT count(*) FROM t WHERE batch = 2") != "2000" {
        assert!(Instant::now() < deadline, "the standby did not catch up");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(standby.sql("SELECT pg_is_in_recovery()"), "t");

    // The primary keeps writing and switching, as a busy one does: its
    // archiver is what brings the standby backup's last segment.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        let env = p.libpq_env();
        std::thread::spawn(move || {
            let started = Instant::now();
            while !stop.load(Ordering::Relaxed) && started.elapsed() < Duration::from_secs(90) {
                let _ = std::process::Command::new("psql")
                    .envs(env.clone())
                    .args([
                        "-AtX",
                        "-c",
                        "CREATE TABLE IF NOT EXISTS noise (x int); INSERT INTO noise VALUES (1); \
                         SELECT pg_switch_wal()",
                    ])
                    .output();
                std::thread::sleep(Duration::from_millis(500));
            }
        })
    };
    let out = s
        .repo
        .walvault_as_postgres(&s.bin)
        .envs(standby.libpq_env())
        .args(["backup", "--archive-timeout", "60", "--pgdata"])
        .arg(&standby.data)
        .output();
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    let out = out.unwrap();
    assert!(
        out.status.success(),
        "backup from the standby: {}",
        describe(&out)
    );
    let id = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .nth(1)
        .unwrap()
        .trim_end_matches(':')
        .to_string();
    let list = s.list_json();
    let newest = list.as_array().unwrap().last().unwrap().clone();
    assert_eq!(newest["id"], id.as_str(), "{list}");
    assert_eq!(newest["timeline"], 1, "{list}");
    drop(standby);

    // Restored to its consistency point it holds what the standby had; to
    // the end of the archive, what the primary has.
    let at_backup = s.restore_and_start("at-backup", &["--backup", &id, "--immediate"]);
    at_backup.wait_promoted();
    assert_eq!(Setup::batches(&at_backup), "1:1000 2:2000");
    drop(at_backup);
    let last = p.switch_wal();
    p.wait_archived(&last);
    let latest = s.restore_and_start("latest", &["--backup", &id]);
    latest.wait_promoted();
    assert_eq!(Setup::batches(&latest), "1:1000 2:2000");
    assert_eq!(
        latest.sql("SELECT count(*) FROM noise"),
        p.sql("SELECT count(*) FROM noise")
    );
}
