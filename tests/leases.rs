//! Leases with a real PostgreSQL 15: a backup running in another pid
//! namespace (as in a container of the same pod: same hostname, pids that
//! mean nothing here) survives a prune, and a backup judged dead is never
//! published.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A primary whose archiving can be held up: archive_command pushes only
/// while `gate` exists, so a backup can be kept waiting at pg_backup_stop
/// with all its packs uploaded.
fn gated_setup() -> (Setup, PathBuf) {
    let dir = scratch();
    let root = dir.path().to_path_buf();
    let bin = install_binary(&root);
    let repo = RepoTarget::local(&root.join("repo"));
    let gate = root.join("archiving-open");
    std::fs::write(&gate, b"").unwrap();
    let archive_command = format!("test -e {} && {}", gate.display(), repo.push_command(&bin));
    let mut primary = PgServer::init(
        &root.join("primary"),
        PgConfig {
            wal_segsize_mb: 1,
            conf: &format!("archive_mode = on\narchive_command = '{archive_command}'"),
            env: vec![],
        },
    );
    primary.start();
    (
        Setup {
            primary,
            bin,
            repo,
            dir,
        },
        gate,
    )
}

fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Starts `walvault backup` as the postgres user inside a new pid namespace,
/// where it gets a pid no process has out here: by the old rule (same host,
/// pid gone) any prune would judge it dead.
fn backup_in_pid_namespace(s: &Setup) -> (Child, u32) {
    let target = (400..4000).find(|p| !pid_alive(*p)).expect("a free pid");
    let mut walvault = vec![format!("exec env")];
    for (k, v) in s.primary.libpq_env() {
        walvault.push(format!("{k}={v}"));
    }
    walvault.push(format!(
        "{} --repo {} backup --archive-timeout 120 --pgdata {}",
        s.bin.display(),
        s.repo.url,
        s.primary.data.display()
    ));
    // Burn pids up to target - 1 (pids are handed out in order in a fresh
    // namespace), then run walvault as a child, so that it gets `target`.
    let script = format!(
        "while :; do /bin/true & p=$!; wait $p; [ $p -ge {} ] && break; done; \
         sh -c '{}'; exit $?",
        target - 1,
        walvault.join(" ")
    );
    let child = Command::new("unshare")
        .args(["-pf", "--mount-proc", "runuser", "-u", "postgres", "--"])
        .args(["sh", "-c", &script])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    (child, target)
}

fn wait_for_backup_stop(s: &Setup, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let waiting = s.primary.sql(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE query LIKE '%pg_backup_stop%' AND pid <> pg_backend_pid()",
        );
        if waiting == "1" {
            return;
        }
        if let Some(status) = child.try_wait().unwrap() {
            let out = child.wait_with_output_now();
            panic!("backup ended early ({status}): {out}");
        }
        assert!(
            Instant::now() < deadline,
            "backup never reached pg_backup_stop"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

trait WaitOutput {
    fn wait_with_output_now(&mut self) -> String;
}

impl WaitOutput for Child {
    fn wait_with_output_now(&mut self) -> String {
        use std::io::Read;
        let mut out = String::new();
        let mut err = String::new();
        if let Some(o) = self.stdout.as_mut() {
            o.read_to_string(&mut out).unwrap();
        }
        if let Some(e) = self.stderr.as_mut() {
            e.read_to_string(&mut err).unwrap();
        }
        format!("stdout: {out}\nstderr: {err}")
    }
}

/// Opens the gate and waits (bounded) for the backup to end; returns its
/// exit status and output.
fn release_and_finish(s: &Setup, gate: &Path, mut child: Child) -> (bool, String) {
    std::fs::write(gate, b"").unwrap();
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let out = child.wait_with_output_now();
            return (status.success(), out);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("backup did not finish once archiving resumed");
        }
        // Wakes the archiver from its wait after failed attempts.
        s.primary.sql("SELECT pg_reload_conf()");
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Like `PgServer::wait_archived`, but the failures while the gate was
/// closed are expected.
fn wait_archived_after_gate(server: &PgServer, segment: &str) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let last = server.sql("SELECT coalesce(last_archived_wal, '') FROM pg_stat_archiver");
        if last.len() >= 24 && last[..24] >= *segment {
            return;
        }
        assert!(Instant::now() < deadline, "{segment} not archived in time");
        server.sql("SELECT pg_reload_conf()");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    walkdir::WalkDir::new(dir)
        .into_iter()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_file())
        .map(|e| e.path().to_path_buf())
        .collect()
}

fn markers(repo: &Path) -> Vec<PathBuf> {
    files_under(&repo.join("locks"))
        .into_iter()
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("backup-")
        })
        .collect()
}

#[test]
fn a_backup_in_another_pid_namespace_survives_prune_and_restores() {
    if !is_root() {
        eprintln!("skipped: unshare needs root");
        return;
    }
    let (s, gate) = gated_setup();
    let repo = PathBuf::from(&s.repo.url);
    s.primary.sql("CREATE TABLE t (batch int, id int)");
    s.primary
        .sql("INSERT INTO t SELECT 1, g FROM generate_series(1, 20000) g");

    std::fs::remove_file(&gate).unwrap();
    let (mut child, pid) = backup_in_pid_namespace(&s);
    wait_for_backup_stop(&s, &mut child);
    let marker = markers(&repo);
    assert_eq!(marker.len(), 1, "{marker:?}");
    let text = std::fs::read_to_string(&marker[0]).unwrap();
    assert!(text.contains(&format!("\"pid\": {pid}")), "{text}");
    assert!(!pid_alive(pid), "pid {pid} exists out here");
    let packs = files_under(&repo.join("packs"));
    assert!(!packs.is_empty());

    // prune from the host's pid namespace, while the backup waits for WAL.
    let out = s
        .repo
        .walvault(&s.bin)
        .args(["prune", "--keep-last", "1"])
        .output()
        .unwrap();
    assert!(out.status.success(), "prune: {}", describe(&out));
    assert_eq!(
        markers(&repo),
        marker,
        "prune removed the live backup's marker"
    );
    assert_eq!(
        files_under(&repo.join("packs")),
        packs,
        "prune deleted packs of a live backup"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("never finished"), "{err}");

    let (ok, output) = release_and_finish(&s, &gate, child);
    assert!(ok, "backup failed: {output}");
    assert!(markers(&repo).is_empty());
    s.primary
        .sql("INSERT INTO t SELECT 2, g FROM generate_series(1, 100) g");
    let last = s.primary.switch_wal();
    wait_archived_after_gate(&s.primary, &last);

    let restored = s.restore_and_start("restored", &[]);
    restored.wait_promoted();
    assert_eq!(Setup::batches(&restored), "1:20000 2:100");
}

#[test]
fn a_backup_judged_dead_is_not_published() {
    let (s, gate) = gated_setup();
    let repo = PathBuf::from(&s.repo.url);
    s.primary.sql("CREATE TABLE t (batch int, id int)");
    s.primary
        .sql("INSERT INTO t SELECT 1, g FROM generate_series(1, 20000) g");
    std::fs::remove_file(&gate).unwrap();
    let mut cmd = s.repo.walvault_as_postgres(&s.bin);
    let mut child = cmd
        .envs(s.primary.libpq_env())
        .args(["backup", "--archive-timeout", "120", "--pgdata"])
        .arg(&s.primary.data)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_backup_stop(&s, &mut child);
    // What a prune does to a backup it judged dead (a process stopped for
    // longer than its lease): its marker and its packs go.
    for m in markers(&repo) {
        std::fs::remove_file(m).unwrap();
    }
    let packs = files_under(&repo.join("packs"));
    assert!(!packs.is_empty());
    std::fs::remove_file(&packs[0]).unwrap();

    let (ok, output) = release_and_finish(&s, &gate, child);
    assert!(!ok, "a backup whose packs are gone was published: {output}");
    assert!(output.contains("judged"), "{output}");
    assert!(
        output.contains("run the backup again") || output.contains("run it again"),
        "{output}"
    );
    assert!(
        !repo.join("backups").exists() || files_under(&repo.join("backups")).is_empty(),
        "a manifest was published"
    );
    let out = s
        .repo
        .walvault(&s.bin)
        .args(["list", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", describe(&out));
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list.as_array().map(|a| a.len()), Some(0), "{list}");
}

/// A backup whose WAL from start to stop does not reach this repository can
/// never be restored: it fails, naming the segment and what to check, and
/// publishes nothing.
#[test]
fn a_backup_whose_wal_is_not_in_the_repository_is_not_published() {
    let mut s = setup(&|root| RepoTarget::local(&root.join("repo")));
    s.primary.sql("CREATE TABLE t (batch int, id int)");
    s.primary
        .sql("INSERT INTO t SELECT 1, g FROM generate_series(1, 1000) g");
    let try_backup = |s: &Setup| {
        s.repo
            .walvault_as_postgres(&s.bin)
            .envs(s.primary.libpq_env())
            .args(["backup", "--archive-timeout", "4", "--pgdata"])
            .arg(&s.primary.data)
            .output()
            .unwrap()
    };
    let refused = |s: &Setup, out: &std::process::Output| {
        assert!(!out.status.success(), "published: {}", describe(out));
        let err = String::from_utf8_lossy(&out.stderr);
        let line = err
            .lines()
            .find(|l| l.contains("is not in"))
            .unwrap_or_else(|| panic!("{}", describe(out)));
        assert!(
            line.contains("WAL segment 0000000100000000")
                && line.contains("archive_mode")
                && line.contains("archive_command")
                && line.contains("is not published"),
            "{line}"
        );
        let list = s.list_json();
        assert_eq!(list.as_array().map(|a| a.len()), Some(0), "{list}");
    };

    // archive_command pointing at another repository.
    let other = RepoTarget::local(&s.root().join("other"));
    s.primary.append_conf(&format!(
        "archive_command = '{}'",
        other.push_command(&s.bin)
    ));
    s.primary.sql("SELECT pg_reload_conf()");
    std::thread::sleep(Duration::from_secs(1));
    refused(&s, &try_backup(&s));

    // Archiving off: PostgreSQL only says so in a notice.
    s.primary.append_conf("archive_mode = off");
    s.primary.stop();
    s.primary.start();
    refused(&s, &try_backup(&s));
}

/// The password can come from a libpq password file (PGPASSFILE), not only
/// from argv or the environment.
#[test]
fn backup_reads_the_password_from_a_password_file() {
    let s = setup(&|root| RepoTarget::local(&root.join("repo")));
    s.primary
        .sql("CREATE ROLE walvault_backup LOGIN SUPERUSER PASSWORD 'Secret:42'");
    let hba = s.primary.data.join("pg_hba.conf");
    let old = std::fs::read_to_string(&hba).unwrap();
    std::fs::write(
        &hba,
        format!("local all walvault_backup scram-sha-256\n{old}"),
    )
    .unwrap();
    s.primary.sql("SELECT pg_reload_conf()");
    let passfile = s.root().join("pgpass");
    std::fs::write(&passfile, "localhost:*:*:walvault_backup:Secret\\:42\n").unwrap();
    std::fs::set_permissions(
        &passfile,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    give_to_postgres(&passfile);
    let backup = |passfile: Option<&Path>| {
        let mut cmd = s.repo.walvault_as_postgres(&s.bin);
        cmd.envs(s.primary.libpq_env())
            .env("PGUSER", "walvault_backup")
            .env("HOME", s.root());
        if let Some(p) = passfile {
            cmd.env("PGPASSFILE", p);
        }
        cmd.args(["backup", "--archive-timeout", "60", "--pgdata"])
            .arg(&s.primary.data)
            .output()
            .unwrap()
    };
    let out = backup(None);
    assert!(!out.status.success(), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("password"),
        "{}",
        describe(&out)
    );
    let out = backup(Some(&passfile));
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(s.list_json().as_array().map(|a| a.len()), Some(1));
}
