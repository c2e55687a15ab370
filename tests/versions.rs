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

/// A major upgrade by dump and restore: the repository of a PostgreSQL 15
/// cluster is bound to the new PostgreSQL 16 cluster with `walvault
/// upgrade`. The new cluster archives and backs up into its own folder (its
/// segment names are the old cluster's again), the old one's pushes are
/// refused, both clusters' backups restore exactly with their own
/// binaries, verify checks both, and prune lets the old cluster go once the
/// new one's backups are enough.
#[test]
#[ignore = "the version matrix: make test-versions"]
fn an_upgrade_keeps_the_old_clusters_backups_restorable() {
    let new_major = if default_major() == 16 { 17 } else { 16 };
    let new_bindir = bindir_for(new_major);
    let s = setup(&|root| RepoTarget::local(&root.join("repo")));
    let old = &s.primary;
    old.sql("CREATE TABLE t (batch int, id int)");
    old.sql("INSERT INTO t SELECT 1, g FROM generate_series(1, 1000) g");
    let old_backup = s.backup();
    old.sql("INSERT INTO t SELECT 2, g FROM generate_series(1, 1000) g");
    let last = old.switch_wal();
    old.wait_archived(&last);
    let old_sysid = old.system_identifier();

    // Dump and restore into a new cluster of the next major version.
    let dump = s.root().join("dump.sql");
    run_capture(
        Command::new(default_pg_bindir().join("pg_dump"))
            .arg("-h")
            .arg(&old.socket_dir)
            .args(["-p", &old.port.to_string(), "-U", "postgres", "-f"])
            .arg(&dump)
            .arg("postgres"),
    );
    let mut new = with_pg_bindir(&new_bindir, || {
        PgServer::init(
            &s.root().join("new"),
            PgConfig {
                wal_segsize_mb: 1,
                conf: &format!(
                    "archive_mode = on\narchive_command = '{}'",
                    s.repo.push_command(&s.bin)
                ),
                env: vec![],
            },
        )
    });
    // Bound before the new cluster's first push, by the DBA as the postgres
    // OS user, who owns the repository: as root the new folder would be
    // root's and every push after the upgrade would fail.
    let out = s
        .repo
        .walvault(&s.bin)
        .args(["upgrade", "--pgdata"])
        .arg(&new.data)
        .output()
        .unwrap();
    assert_refused(&out, 2, "run walvault upgrade as postgres");
    assert!(!s.root().join("repo/clusters").exists());
    let out = s
        .repo
        .walvault_as_postgres(&s.bin)
        .args(["upgrade", "--pgdata"])
        .arg(&new.data)
        .output()
        .unwrap();
    assert!(out.status.success(), "upgrade: {}", describe(&out));
    new.start();
    let new_sysid = new.system_identifier();
    assert_ne!(new_sysid, old_sysid);
    run_capture(new.psql_command().arg("-f").arg(&dump));
    assert_eq!(Setup::batches(&new), "1:1000 2:1000");
    new.sql("INSERT INTO t SELECT 3, g FROM generate_series(1, 1000) g");
    let new_backup = s.backup_of(&new);
    new.sql("INSERT INTO t SELECT 4, g FROM generate_series(1, 1000) g");
    let last = new.switch_wal();
    new.wait_archived(&last);
    // The new cluster's segments have the old one's names, in its folder.
    let folder = s.root().join(format!(
        "repo/clusters/{new_major}-{new_sysid}/wal/0000000100000000"
    ));
    let names = |dir: &Path| -> Vec<String> {
        let mut n: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        n.sort();
        n
    };
    let old_wal = s.root().join("repo/wal/0000000100000000");
    let both: Vec<String> = names(&folder)
        .into_iter()
        .filter(|n| names(&old_wal).contains(n))
        .collect();
    assert!(
        !both.is_empty(),
        "{:?} {:?}",
        names(&folder),
        names(&old_wal)
    );
    for n in &both {
        assert_ne!(
            std::fs::read(folder.join(n)).unwrap(),
            std::fs::read(old_wal.join(n)).unwrap(),
            "{n}"
        );
    }

    // The repository never goes back to the old cluster.
    let out = s
        .repo
        .walvault_as_postgres(&s.bin)
        .args(["upgrade", "--pgdata"])
        .arg(&old.data)
        .output()
        .unwrap();
    assert_refused(&out, 3, "never goes back");

    // The old cluster archives there no more.
    old.sql("INSERT INTO t SELECT 9, g FROM generate_series(1, 10) g");
    let refused = old.switch_wal();
    let path = old.data.join("pg_wal").join(&refused);
    let out = s
        .repo
        .walvault(&s.bin)
        .arg("push")
        .arg(&path)
        .arg(&refused)
        .output()
        .unwrap();
    assert_refused(&out, 3, "archives there no more");

    // A fetch without --cluster delivers the WAL of the cluster whose data
    // directory asks, never the other's segment of the same name; a data
    // directory of neither is refused, and in archive recovery that stops
    // recovery rather than end it.
    let n = both[0].strip_suffix(".zst").unwrap();
    for (server, sysid) in [(old, &old_sysid), (&new, &new_sysid)] {
        let into = format!("pg_wal/walvault-test-{n}");
        let out = s
            .repo
            .walvault_as_postgres(&s.bin)
            .current_dir(&server.data)
            .args(["fetch", n, &into])
            .output()
            .unwrap();
        assert!(out.status.success(), "fetch: {}", describe(&out));
        let fetched = server.data.join(&into);
        let page = std::fs::read(&fetched).unwrap();
        let written_by = u64::from_le_bytes(page[24..32].try_into().unwrap());
        assert_eq!(written_by.to_string(), *sysid, "{n} fetched for {sysid}");
        std::fs::remove_file(&fetched).unwrap();
    }
    let stranger = s.root().join("stranger");
    std::fs::create_dir_all(stranger.join("global")).unwrap();
    std::fs::create_dir_all(stranger.join("pg_wal")).unwrap();
    std::fs::write(
        stranger.join("global/pg_control"),
        [&12345u64.to_le_bytes()[..], &[0u8; 8184]].concat(),
    )
    .unwrap();
    std::fs::write(stranger.join("recovery.signal"), "").unwrap();
    let recovery_stops = |why: &str| {
        let out = s
            .repo
            .walvault(&s.bin)
            .current_dir(&stranger)
            .args(["fetch", n, "pg_wal/RECOVERYXLOG"])
            .output()
            .unwrap();
        assert!(out.status.code().unwrap_or(0) > 125, "{}", describe(&out));
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(why),
            "{}",
            describe(&out)
        );
        assert!(!stranger.join("pg_wal/RECOVERYXLOG").exists());
    };
    recovery_stops("holds no WAL of that cluster");
    // A control file that cannot be read leaves the cluster unknown: no
    // guess, and recovery stops.
    std::fs::remove_file(stranger.join("global/pg_control")).unwrap();
    std::fs::create_dir(stranger.join("global/pg_control")).unwrap();
    recovery_stops("to tell which cluster is recovering");

    // A backup id two clusters hold is refused, never guessed between.
    let twin = s.root().join(format!(
        "repo/clusters/{new_major}-{new_sysid}/backups/{old_backup}"
    ));
    std::fs::create_dir_all(&twin).unwrap();
    let manifest = s
        .root()
        .join(format!("repo/backups/{old_backup}/manifest.json.zst"));
    std::fs::copy(&manifest, twin.join("manifest.json.zst")).unwrap();
    for args in [
        vec!["restore", "--backup", &old_backup, "--pgdata"],
        vec!["verify", "--backup", &old_backup],
    ] {
        let target = s.root().join("twin-restore");
        let mut cmd = s.repo.walvault(&s.bin);
        cmd.args(&args);
        if args[0] == "restore" {
            cmd.arg(&target);
        }
        let out = cmd.output().unwrap();
        assert_refused(&out, 3, "cannot tell which one is meant");
        assert!(!target.exists());
    }
    std::fs::remove_dir_all(&twin).unwrap();

    // Both clusters' backups are listed and restore with their own binaries.
    let list = s.list_json();
    let sysids: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["system_identifier"].as_str().unwrap())
        .collect();
    assert_eq!(sysids, [old_sysid.as_str(), new_sysid.as_str()], "{list}");
    let out = s.repo.walvault(&s.bin).arg("status").output().unwrap();
    assert!(out.status.success(), "status: {}", describe(&out));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("(format 2)"), "{said}");
    assert!(
        said.contains(&format!(
            "cluster      {new_sysid} (PostgreSQL {new_major}, 1 MiB segments)"
        )),
        "{said}"
    );
    assert!(
        said.contains(&format!(
            "earlier      cluster {old_sysid} (PostgreSQL {}), before an upgrade: 1 backups",
            default_major()
        )),
        "{said}"
    );
    let restored_old = s.restore_and_start("old-latest", &["--backup", &old_backup]);
    restored_old.wait_promoted();
    assert_eq!(Setup::batches(&restored_old), "1:1000 2:1000");
    drop(restored_old);
    let restored_new = with_pg_bindir(&new_bindir, || {
        s.restore_and_start("new-latest", &["--backup", &new_backup])
    });
    restored_new.wait_promoted();
    assert_eq!(Setup::batches(&restored_new), "1:1000 2:1000 3:1000 4:1000");
    drop(restored_new);
    let out = s.repo.walvault(&s.bin).arg("verify").output().unwrap();
    assert!(out.status.success(), "verify: {}", describe(&out));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("2 backups"), "{said}");

    // Retention counts both clusters' backups: keeping the newest one
    // lets the old cluster go, backups and WAL.
    let out = s
        .repo
        .walvault_as_postgres(&s.bin)
        .args(["prune", "--keep-last", "1"])
        .output()
        .unwrap();
    assert!(out.status.success(), "prune: {}", describe(&out));
    let list = s.list_json();
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
    assert_eq!(list[0]["id"], new_backup.as_str());
    assert!(
        !s.root()
            .join("repo/wal/0000000100000000/000000010000000000000002.zst")
            .exists()
    );
    let out = s.repo.walvault(&s.bin).arg("verify").output().unwrap();
    assert!(
        out.status.success(),
        "verify after prune: {}",
        describe(&out)
    );

    // A timeline history file pushed from outside any pg_wal belongs to the
    // cluster archiving now.
    let history = s.root().join("00000007.history");
    std::fs::write(&history, "6\t0/5000000\tno recovery target specified\n").unwrap();
    let out = s
        .repo
        .walvault(&s.bin)
        .arg("push")
        .arg(&history)
        .arg("00000007.history")
        .output()
        .unwrap();
    assert!(out.status.success(), "push history: {}", describe(&out));
    assert!(
        s.root()
            .join(format!(
                "repo/clusters/{new_major}-{new_sysid}/wal/00000007.history.zst"
            ))
            .exists()
    );
    assert!(!s.root().join("repo/wal/00000007.history.zst").exists());
    drop(new);
}

/// `out` is a refusal: exit `code`, and stderr says `says`.
fn assert_refused(out: &std::process::Output, code: i32, says: &str) {
    assert_eq!(out.status.code(), Some(code), "{}", describe(out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(says),
        "{}",
        describe(out)
    );
}
