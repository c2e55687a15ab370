//! archive_command and restore_command driven by a real PostgreSQL 15.

mod common;

use common::*;
use std::path::Path;

/// Archives through walvault (keeping PostgreSQL's own copy of every file for
/// comparison), fetches each file back byte for byte, then recovers a base
/// backup taken without WAL from the archive alone.
fn archive_and_recover(repo_for: impl Fn(&Path) -> RepoTarget, wal_segsize_mb: u32) {
    let dir = scratch();
    let root = dir.path();
    let bin = install_binary(root);
    let repo = repo_for(root);
    let keep = root.join("keep");
    std::fs::create_dir(&keep).unwrap();
    give_to_postgres(&keep);

    let archive_command = format!("cp %p {}/%f && {}", keep.display(), repo.push_command(&bin));
    let mut primary = PgServer::init(
        &root.join("primary"),
        PgConfig {
            wal_segsize_mb,
            conf: &format!("archive_mode = on\narchive_command = '{archive_command}'"),
            env: vec![],
        },
    );
    primary.start();
    primary.sql("CREATE TABLE t (id int, batch int)");
    primary.sql("INSERT INTO t SELECT g, 1 FROM generate_series(1, 1000) g");
    primary.switch_wal();

    // A copy with no WAL of its own: only the archive can make it consistent.
    let copy = root.join("copy");
    let out = as_postgres(pg_bindir().join("pg_basebackup"))
        .arg("-h")
        .arg(&primary.socket_dir)
        .args([
            "-p", "5432", "-U", "postgres", "-X", "none", "-c", "fast", "-D",
        ])
        .arg(&copy)
        .output()
        .unwrap();
    assert!(out.status.success(), "pg_basebackup: {}", describe(&out));

    primary.sql("INSERT INTO t SELECT g, 2 FROM generate_series(1, 1000) g");
    primary.switch_wal();
    // Enough rows to fill more than one segment on the small-segment runs.
    primary.sql("INSERT INTO t SELECT g, 3 FROM generate_series(1, 50000) g");
    let last = primary.switch_wal();
    primary.wait_archived(&last);
    let sysid = primary.system_identifier();
    primary.stop();

    // Every file PostgreSQL archived comes back exactly.
    let mut names: Vec<String> = std::fs::read_dir(&keep)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    let segments = names.iter().filter(|n| n.len() == 24).count();
    assert!(segments >= 4, "only {names:?} archived");
    assert!(
        names.iter().any(|n| n.ends_with(".backup")),
        "no backup history file in {names:?}"
    );
    let fetched = root.join("fetched");
    std::fs::create_dir(&fetched).unwrap();
    for name in &names {
        let dest = fetched.join(name);
        let out = repo
            .walvault(&bin)
            .arg("fetch")
            .arg(name)
            .arg(&dest)
            .output()
            .unwrap();
        assert!(out.status.success(), "fetch {name}: {}", describe(&out));
        assert!(
            std::fs::read(&dest).unwrap() == std::fs::read(keep.join(name)).unwrap(),
            "{name} differs from what PostgreSQL archived"
        );
    }
    // walvault reads the same transaction times from each segment as pg_waldump.
    let mut compared = 0;
    for name in names.iter().filter(|n| n.len() == 24) {
        let path = keep.join(name);
        let ours: Vec<String> =
            walvault::pg::walscan::transaction_times(&std::fs::read(&path).unwrap())
                .iter()
                .map(|t| t.format("%Y-%m-%d %H:%M:%S%.6f UTC").to_string())
                .collect();
        let dump = std::process::Command::new(pg_bindir().join("pg_waldump"))
            .arg(&path)
            .output()
            .unwrap();
        let theirs: Vec<String> = String::from_utf8_lossy(&dump.stdout)
            .lines()
            .filter(|l| l.contains("rmgr: Transaction"))
            .filter_map(|l| {
                let desc = l.split("desc: ").nth(1)?;
                let rest = desc
                    .strip_prefix("COMMIT ")
                    .or_else(|| desc.strip_prefix("ABORT "))?;
                Some(rest.split(';').next()?.trim().to_string())
            })
            .collect();
        assert_eq!(ours, theirs, "transaction times of {name}");
        compared += theirs.len();
    }
    assert!(compared >= 3, "too few commits compared: {compared}");

    // The repository is bound to this cluster.
    let out = repo
        .walvault(&bin)
        .arg("fetch")
        .arg(&names[0])
        .arg(fetched.join("again"))
        .output()
        .unwrap();
    assert!(out.status.success());
    let _ = sysid;

    // Recover the copy from the archive alone.
    let mut auto = std::fs::OpenOptions::new()
        .append(true)
        .open(copy.join("postgresql.auto.conf"))
        .unwrap();
    use std::io::Write;
    writeln!(
        auto,
        "archive_mode = off\nrestore_command = '{}{} --repo {} fetch %f %p'",
        repo.env_prefix(),
        bin.display(),
        repo.url
    )
    .unwrap();
    std::fs::write(copy.join("recovery.signal"), b"").unwrap();
    give_to_postgres(&copy);
    let mut restored = PgServer::existing(&root.join("restored"), &copy, vec![]);
    give_to_postgres(&root.join("restored"));
    restored.start();
    restored.wait_promoted();
    assert_eq!(
        restored.sql("SELECT batch, count(*) FROM t GROUP BY batch ORDER BY batch"),
        "1|1000\n2|1000\n3|50000"
    );
    let log = restored.log();
    assert!(
        !log.contains("walvault: error"),
        "errors during recovery:\n{log}"
    );
    assert!(
        log.contains("restored log file"),
        "nothing came from the archive:\n{log}"
    );
    assert!(log.contains("archive recovery complete"), "{log}");
    restored.stop();
}

#[test]
fn fs_postgres_archives_and_recovers_with_16mib_segments() {
    archive_and_recover(|root| RepoTarget::local(&root.join("repo")), 16);
}

#[test]
fn s3_postgres_archives_and_recovers_with_1mib_segments() {
    let s3 = S3Server::start();
    archive_and_recover(|_| s3.target("pg"), 1);
}

/// The repository records the cluster on first push and refuses a second one.
#[test]
fn second_cluster_is_refused() {
    let dir = scratch();
    let root = dir.path();
    let bin = install_binary(root);
    let repo = RepoTarget::local(&root.join("repo"));
    let command = repo.push_command(&bin);
    let conf = format!("archive_mode = on\narchive_command = '{command}'");
    let mut first = PgServer::init(
        &root.join("a"),
        PgConfig {
            wal_segsize_mb: 1,
            conf: &conf,
            env: vec![],
        },
    );
    first.start();
    let seg = first.switch_wal();
    first.wait_archived(&seg);
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(root.join("repo/walvault.json")).unwrap()).unwrap();
    assert_eq!(
        config["system_identifier"].as_str().unwrap(),
        first.system_identifier()
    );
    assert_eq!(config["pg_version"], 15);
    first.stop();

    let mut second = PgServer::init(
        &root.join("b"),
        PgConfig {
            wal_segsize_mb: 1,
            conf: &conf,
            env: vec![],
        },
    );
    second.start();
    second.sql("SELECT pg_switch_wal()");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while second.sql("SELECT failed_count FROM pg_stat_archiver") == "0" {
        assert!(
            std::time::Instant::now() < deadline,
            "second cluster was never refused"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let log = second.log();
    assert!(
        log.contains("belongs to cluster") && log.contains(&second.system_identifier()),
        "{log}"
    );
    second.stop();
}

/// A backlog of `.ready` segments drains through push-ahead: later calls are
/// answered from verified records, and every file comes back exactly.
#[test]
fn backlog_drains_with_push_ahead() {
    let dir = scratch();
    let root = dir.path();
    let bin = install_binary(root);
    let repo = RepoTarget::local(&root.join("repo"));
    let keep = root.join("keep");
    std::fs::create_dir(&keep).unwrap();
    give_to_postgres(&keep);
    let mut pg = PgServer::init(
        &root.join("primary"),
        PgConfig {
            wal_segsize_mb: 1,
            conf: "archive_mode = on\narchive_command = '/bin/false'",
            env: vec![],
        },
    );
    pg.start();
    pg.sql("CREATE TABLE t (id int)");
    let mut last = String::new();
    for _ in 0..12 {
        pg.sql("INSERT INTO t SELECT g FROM generate_series(1, 1000) g");
        last = pg.switch_wal();
    }
    pg.append_conf(&format!(
        "archive_command = 'cp %p {}/%f && {} --repo {} push --push-ahead 4 %p %f'",
        keep.display(),
        bin.display(),
        repo.url
    ));
    // The failures so far were ours to make; count from here.
    pg.sql("SELECT pg_stat_reset_shared('archiver')");
    pg.sql("SELECT pg_reload_conf()");
    pg.wait_archived(&last);
    let log = pg.log();
    // The pushing ahead is done by a background worker, which logs to the spool.
    let spool = root.join("primary/data/pg_wal/walvault-spool");
    wait_for_spool_workers(&spool);
    let worker_log = std::fs::read_to_string(spool.join("push-worker.log")).unwrap();
    assert!(
        worker_log.contains("segments ahead"),
        "no push-ahead:\n{worker_log}"
    );
    assert!(
        log.contains("archived ahead; verified unchanged"),
        "no call answered from a record:\n{log}"
    );
    pg.stop();
    for entry in std::fs::read_dir(&keep).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name().into_string().unwrap();
        let dest = root.join("fetched");
        let out = repo
            .walvault(&bin)
            .arg("fetch")
            .arg(&name)
            .arg(&dest)
            .output()
            .unwrap();
        assert!(out.status.success(), "fetch {name}: {}", describe(&out));
        assert!(
            std::fs::read(&dest).unwrap() == std::fs::read(entry.path()).unwrap(),
            "{name} differs"
        );
    }
}
