//! `walvault check` against a real PostgreSQL 15: a healthy setup passes
//! with a proven round trip; a repository the archiver does not write to, a
//! cluster without a backup and a server with archiving off each fail,
//! naming the cause, with exit 7.

mod common;

use common::*;

fn check(s: &Setup, url: &str, extra: &[&str]) -> std::process::Output {
    std::process::Command::new(&s.bin)
        .envs(s.primary.libpq_env())
        .arg("--repo")
        .arg(url)
        .args(["check", "--timeout", "5"])
        .args(extra)
        .output()
        .unwrap()
}

fn line<'a>(stdout: &'a str, check: &str) -> &'a str {
    stdout
        .lines()
        .find(|l| l.get(6..).is_some_and(|rest| rest.starts_with(check)))
        .unwrap_or_else(|| panic!("no '{check}' line in:\n{stdout}"))
}

#[test]
fn a_healthy_setup_passes_and_proves_the_round_trip() {
    let s = setup(&|root| RepoTarget::local(&root.join("repo")));
    s.primary.sql("CREATE TABLE t AS SELECT 1 AS x");
    s.backup();
    let out = check(&s, &s.repo.url.clone(), &[]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    for name in [
        "server",
        "archive_mode",
        "archive_command",
        "repository",
        "archiver",
        "round trip",
        "backups",
    ] {
        assert!(line(&stdout, name).starts_with("ok "), "{stdout}");
    }
    assert!(
        line(&stdout, "round trip").contains("sha256 proven"),
        "{stdout}"
    );

    let out = check(&s, &s.repo.url.clone(), &["--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["ok"], true, "{report}");
    let trip = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["check"] == "round trip")
        .unwrap();
    assert_eq!(trip["verdict"], "ok", "{report}");
}

#[test]
fn a_repository_the_archiver_does_not_feed_fails() {
    let s = setup(&|root| RepoTarget::local(&root.join("repo")));
    s.primary.sql("CREATE TABLE t AS SELECT 1 AS x");
    let elsewhere = s.root().join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    let out = check(&s, elsewhere.to_str().unwrap(), &[]);
    assert_eq!(out.status.code(), Some(7), "{}", describe(&out));
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let trip = line(&stdout, "round trip");
    assert!(
        trip.starts_with("FAIL") && trip.contains("is not in the repository"),
        "{stdout}"
    );
    assert!(
        line(&stdout, "archive_command").starts_with("warn"),
        "{stdout}"
    );
    assert!(line(&stdout, "backups").starts_with("FAIL"), "{stdout}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("round trip") && stderr.contains("backups"),
        "{stderr}"
    );
}

#[test]
fn archiving_off_fails_by_name() {
    let dir = scratch();
    let root = dir.path();
    let bin = install_binary(root);
    let mut server = PgServer::init(
        &root.join("pg"),
        PgConfig {
            wal_segsize_mb: 1,
            conf: "archive_mode = off",
            env: vec![],
        },
    );
    server.start();
    let repo = root.join("repo");
    std::fs::create_dir(&repo).unwrap();
    let out = std::process::Command::new(&bin)
        .envs(server.libpq_env())
        .arg("--repo")
        .arg(&repo)
        .args(["check", "--timeout", "2"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(7), "{}", describe(&out));
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        line(&stdout, "archive_mode").starts_with("FAIL")
            && line(&stdout, "archive_mode").contains("set archive_mode = on"),
        "{stdout}"
    );
    assert!(
        line(&stdout, "archive_command").starts_with("FAIL"),
        "{stdout}"
    );
}
