//! The version matrix: the same life of a cluster on every PostgreSQL major
//! version walvault supports (13 to 18): archive through walvault, an online
//! backup, point-in-time recovery by time, recovery to the end of the archive,
//! verify and a drill, each checked by exact rows.
//!
//! Version 15 comes from Debian's packages; the others are the server-only
//! builds `make setup` fetches into `.tools/pg/<major>`. `make test` skips
//! these (they start a dozen servers); `make test-versions` runs them.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

/// The major version of the default (Debian) installation.
fn default_major() -> u32 {
    let out = Command::new(default_pg_bindir().join("postgres"))
        .arg("--version")
        .output()
        .expect("postgres --version");
    let text = String::from_utf8_lossy(&out.stdout);
    // "postgres (PostgreSQL) 15.14 (Debian 15.14-0+deb12u1)"
    text.split_whitespace()
        .nth(2)
        .and_then(|v| v.split('.').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("cannot read the version from {text:?}"))
}

/// Serialises copies of server builds into the temp folder.
static COPYING: Mutex<()> = Mutex::new(());

/// Server binaries of `major`, where the `postgres` OS user can run them.
fn bindir_for(major: u32) -> PathBuf {
    if major == default_major() {
        return default_pg_bindir();
    }
    let install = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(".tools/pg")
        .join(major.to_string());
    assert!(
        install.join("bin/postgres").exists(),
        "no PostgreSQL {major} in {}: run 'make setup'",
        install.display()
    );
    let reachable = as_postgres("test")
        .arg("-x")
        .arg(install.join("bin/postgres"))
        .status()
        .is_ok_and(|s| s.success());
    if reachable {
        return install.join("bin");
    }
    // The checkout may sit where only root can go: a copy in the temp
    // folder, made once per release and reused.
    let _guard = COPYING.lock().unwrap_or_else(|e| e.into_inner());
    let version = std::fs::read_to_string(install.join("VERSION")).unwrap_or_default();
    let copy = std::env::temp_dir().join(format!("walvault-pg-{}", version.trim()));
    if !copy.join("bin/postgres").exists() {
        let partial = copy.with_extension("partial");
        let _ = std::fs::remove_dir_all(&partial);
        run_capture(Command::new("cp").arg("-a").arg(&install).arg(&partial));
        run_capture(Command::new("chmod").arg("-R").arg("a+rX").arg(&partial));
        std::fs::rename(&partial, &copy).unwrap();
    }
    copy.join("bin")
}

/// Archive, backup, PITR by time, latest, verify and drill on one version.
fn life_of_a_cluster(major: u32) {
    let bindir = bindir_for(major);
    with_pg_bindir(&bindir, || {
        let s = setup(&|root| RepoTarget::local(&root.join("repo")));
        let p = &s.primary;
        let version: u32 = p.sql("SHOW server_version_num").parse().unwrap();
        assert_eq!(
            version / 10000,
            major,
            "the server under test is not {major}"
        );

        p.sql("CREATE TABLE t (batch int, id int)");
        p.sql("INSERT INTO t SELECT 1, g FROM generate_series(1, 1000) g");
        let backup_id = s.backup();
        p.sql("INSERT INTO t SELECT 2, g FROM generate_series(1, 1000) g");
        std::thread::sleep(Duration::from_millis(300));
        let between_2_and_3 = p.sql("SELECT clock_timestamp()");
        std::thread::sleep(Duration::from_millis(300));
        p.sql("INSERT INTO t SELECT 3, g FROM generate_series(1, 1000) g");
        let last = p.switch_wal();
        p.wait_archived(&last);

        let list = s.list_json();
        assert_eq!(list[0]["id"], backup_id.as_str());
        assert_eq!(
            list[0]["pg_version"].as_u64(),
            Some(u64::from(version)),
            "{list}"
        );

        let by_time = s.restore_and_start("by-time", &["--time", &between_2_and_3]);
        by_time.wait_promoted();
        assert_eq!(Setup::batches(&by_time), "1:1000 2:1000");
        drop(by_time);

        let latest = s.restore_and_start("latest", &["--backup", "latest"]);
        latest.wait_promoted();
        assert_eq!(Setup::batches(&latest), "1:1000 2:1000 3:1000");
        drop(latest);

        let out = s.repo.walvault(&s.bin).arg("verify").output().unwrap();
        assert!(out.status.success(), "verify: {}", describe(&out));

        let out = s
            .repo
            .walvault(&s.bin)
            .args(["drill", "--check-sql", "SELECT count(*) FROM t"])
            .arg("--pg-bin")
            .arg(&bindir)
            .output()
            .unwrap();
        assert!(out.status.success(), "drill: {}", describe(&out));
    });
}

#[test]
#[ignore = "the version matrix: make test-versions"]
fn postgresql_13() {
    life_of_a_cluster(13);
}

#[test]
#[ignore = "the version matrix: make test-versions"]
fn postgresql_14() {
    life_of_a_cluster(14);
}

#[test]
#[ignore = "the version matrix: make test-versions"]
fn postgresql_15() {
    life_of_a_cluster(15);
}

#[test]
#[ignore = "the version matrix: make test-versions"]
fn postgresql_16() {
    life_of_a_cluster(16);
}

#[test]
#[ignore = "the version matrix: make test-versions"]
fn postgresql_17() {
    life_of_a_cluster(17);
}

#[test]
#[ignore = "the version matrix: make test-versions"]
fn postgresql_18() {
    life_of_a_cluster(18);
}
