//! drill and restore on a shared machine: the drill's server is private to
//! the user running it, replay that stops short of the archive fails the
//! drill, and a restore writes only where it belongs.

mod common;

use common::*;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// A folder like /tmp: every local user may create entries in it.
fn shared_temp_folder() -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("walvault-shared-")
        .tempdir()
        .unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o1777)).unwrap();
    dir
}

/// psql as another OS user, against the server whose socket is in `socket_dir`.
fn psql_as(os_user: &str, socket_dir: &Path) -> std::process::Output {
    Command::new("runuser")
        .args(["-u", os_user, "--"])
        .arg(pg_bindir().join("psql"))
        .arg("-h")
        .arg(socket_dir)
        .args(["-p", "5432", "-U", "postgres", "-d", "postgres", "-AtX"])
        .args(["-c", "SELECT 'connected'"])
        .output()
        .unwrap()
}

/// The running drill's scratch directory, once its server's socket is there.
fn wait_for_drill_socket(
    parent: &Path,
    planted: &[&str],
    drill: &mut std::process::Child,
) -> PathBuf {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        for entry in std::fs::read_dir(parent).unwrap() {
            let entry = entry.unwrap();
            let name = entry.file_name().to_string_lossy().into_owned();
            if planted.contains(&name.as_str()) {
                continue;
            }
            if entry.path().join(".s.PGSQL.5432").exists() {
                return entry.path();
            }
        }
        if let Some(status) = drill.try_wait().unwrap() {
            panic!("the drill ended ({status}) before its server was seen");
        }
        assert!(
            Instant::now() < deadline,
            "no drill server appeared in 120 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn another_local_user_cannot_reach_the_drill_server() {
    if !is_root() {
        eprintln!("skipped: needs root to act as other OS users");
        return;
    }
    let s = setup(&|root| RepoTarget::local(&root.join("repo")));
    s.primary
        .sql("CREATE TABLE t AS SELECT g FROM generate_series(1, 1000) g");
    s.backup();
    let last = s.primary.switch_wal();
    s.primary.wait_archived(&last);

    // What another user may have left in the shared temp folder beforehand.
    let shared = shared_temp_folder();
    let planted_dir = shared.path().join("walvault-drill-planted");
    std::fs::create_dir(&planted_dir).unwrap();
    std::fs::set_permissions(&planted_dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let victim = s.root().join("victim");
    std::fs::write(&victim, b"untouched").unwrap();
    std::os::unix::fs::symlink(&victim, shared.path().join("walvault-drill-link")).unwrap();
    let planted = ["walvault-drill-planted", "walvault-drill-link"];

    // As root, like a cron job: the server runs as postgres.
    let mut drill = s
        .repo
        .walvault(&s.bin)
        .args(["drill", "--json", "--scratch"])
        .arg(shared.path())
        .args(["--check-sql", "SELECT count(*) FROM t, pg_sleep(8)"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let dir = wait_for_drill_socket(shared.path(), &planted, &mut drill);
    let meta = std::fs::symlink_metadata(&dir).unwrap();
    let nobody = psql_as("nobody", &dir);
    // The server's own OS user reaches the socket, but is not the drill's user.
    let postgres = psql_as("postgres", &dir);
    let out = drill.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", describe(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["check_sql_result"], "1000", "{report}");

    assert!(meta.is_dir() && !meta.file_type().is_symlink());
    assert_eq!(meta.mode() & 0o7777, 0o700, "scratch directory mode");
    let postgres_uid: u32 = run_capture(Command::new("id").args(["-u", "postgres"]))
        .trim()
        .parse()
        .unwrap();
    assert_eq!(meta.uid(), postgres_uid, "scratch directory owner");
    assert!(
        !nobody.status.success() && !String::from_utf8_lossy(&nobody.stdout).contains("connected"),
        "another OS user connected to the drill's server: {}",
        describe(&nobody)
    );
    assert!(
        !postgres.status.success()
            && !String::from_utf8_lossy(&postgres.stdout).contains("connected"),
        "an OS user other than the drill's connected: {}",
        describe(&postgres)
    );
    // Nothing planted was used or followed, and the scratch directory is gone.
    assert_eq!(std::fs::read(&victim).unwrap(), b"untouched");
    assert_eq!(std::fs::read_dir(&planted_dir).unwrap().count(), 0);
    let left: Vec<_> = std::fs::read_dir(shared.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !planted.contains(&n.as_str()))
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

/// The stored object of WAL segment `name` in a filesystem repository.
fn wal_object(repo: &Path, name: &str) -> PathBuf {
    walkdir::WalkDir::new(repo.join("wal"))
        .into_iter()
        .map(|e| e.unwrap().into_path())
        .find(|p| p.file_name().unwrap().to_string_lossy() == format!("{name}.zst"))
        .unwrap_or_else(|| panic!("no object for {name}"))
}

fn drill_as_postgres(s: &Setup, parent: &Path) -> (std::process::Output, serde_json::Value) {
    let out = s
        .repo
        .walvault_as_postgres(&s.bin)
        .args(["drill", "--json", "--scratch"])
        .arg(parent)
        .args(["--check-sql", "SELECT count(*) FROM t"])
        .output()
        .unwrap();
    let report = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("no json report ({e}): {}", describe(&out)));
    (out, report)
}

#[test]
fn drill_fails_when_replay_stops_short_of_the_archive() {
    let s = setup(&|root| RepoTarget::local(&root.join("repo")));
    let p = &s.primary;
    p.sql("CREATE TABLE t (batch int, id int)");
    s.backup();
    let mut segments = vec![];
    for batch in 1..=5 {
        p.sql(&format!(
            "INSERT INTO t SELECT {batch}, g FROM generate_series(1, 5000) g"
        ));
        segments.push(p.switch_wal());
    }
    p.wait_archived(segments.last().unwrap());
    let parent = s.root().join("drills");
    std::fs::create_dir(&parent).unwrap();
    give_to_postgres(&parent);

    // The whole archive: the drill passes and sees every row, though the
    // primary archives more while it runs.
    let mut drill = s
        .repo
        .walvault_as_postgres(&s.bin)
        .args(["drill", "--json", "--scratch"])
        .arg(&parent)
        .args(["--check-sql", "SELECT count(*) FROM t, pg_sleep(4)"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_drill_socket(&parent, &[], &mut drill);
    for batch in 6..=7 {
        p.sql(&format!(
            "INSERT INTO t SELECT {batch}, g FROM generate_series(1, 5000) g"
        ));
        segments.push(p.switch_wal());
    }
    p.wait_archived(segments.last().unwrap());
    let out = drill.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", describe(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let rows = report["check_sql_result"].as_str().unwrap();
    assert!(["25000", "30000", "35000"].contains(&rows), "{report}");

    // A segment missing in the middle: fetch stops recovery there (it would
    // otherwise promote without the rest); the drill fails, naming the gap.
    let missing = wal_object(&s.root().join("repo"), &segments[1]);
    let saved = std::fs::read(&missing).unwrap();
    std::fs::remove_file(&missing).unwrap();
    let (out, report) = drill_as_postgres(&s, &parent);
    assert_eq!(out.status.code(), Some(4), "{}", describe(&out));
    assert_eq!(report["ok"], false, "{report}");
    let error = report["error"].as_str().unwrap();
    assert!(
        error.contains("recovery stopped before the end of the archive")
            && error.contains("gap")
            && error.contains(&segments[1]),
        "{error}"
    );
    std::fs::write(&missing, &saved).unwrap();
    give_to_postgres(&missing);

    // A damaged segment in the middle: the drill fails too.
    let damaged = wal_object(&s.root().join("repo"), &segments[2]);
    let mut bytes = std::fs::read(&damaged).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x55;
    std::fs::write(&damaged, &bytes).unwrap();
    let (out, report) = drill_as_postgres(&s, &parent);
    assert_eq!(out.status.code(), Some(4), "{}", describe(&out));
    assert_eq!(report["ok"], false, "{report}");
    let error = report["error"].as_str().unwrap();
    assert!(
        error.contains("damaged") && error.contains(&segments[2]),
        "{error}"
    );
    assert_eq!(
        std::fs::read_dir(&parent).unwrap().count(),
        0,
        "scratch dir left behind"
    );
}

/// A restore writes only into a directory of its own user, and a tablespace
/// only where it lived beside the data directory unless told otherwise.
#[test]
fn restore_writes_only_where_it_belongs() {
    let s = setup(&|root| RepoTarget::local(&root.join("repo")));
    let p = &s.primary;
    let ts = s.root().join("ts-original");
    std::fs::create_dir(&ts).unwrap();
    give_to_postgres(&ts);
    p.sql(&format!(
        "CREATE TABLESPACE extra LOCATION '{}'",
        ts.display()
    ));
    p.sql("CREATE TABLE t TABLESPACE extra AS SELECT g FROM generate_series(1, 1000) g");
    let oid = p.sql("SELECT oid FROM pg_tablespace WHERE spcname = 'extra'");
    s.backup();
    // The tablespace's old location is now empty, like one on another host.
    p.sql("ALTER TABLE t SET TABLESPACE pg_default");
    p.sql("DROP TABLESPACE extra");
    let last = p.switch_wal();
    p.wait_archived(&last);
    assert_eq!(std::fs::read_dir(&ts).unwrap().count(), 0);

    // Unmapped, outside the restore's parent directory: refused, nothing written there.
    let out = s.restore("no-map", &[]);
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("--tablespace-map {oid}=DIR")),
        "{err}"
    );
    assert_eq!(
        std::fs::read_dir(&ts).unwrap().count(),
        0,
        "wrote into {}",
        ts.display()
    );

    if is_root() {
        // An empty directory another user owns (and can write): refused.
        let shared = shared_temp_folder();
        let foreign = shared.path().join("pgdata");
        std::fs::create_dir(&foreign).unwrap();
        std::fs::set_permissions(&foreign, std::fs::Permissions::from_mode(0o777)).unwrap();
        std::os::unix::fs::chown(&foreign, Some(65534), Some(65534)).unwrap();
        let moved = s.root().join("ts-moved");
        let out = s
            .repo
            .walvault(&s.bin)
            .arg("restore")
            .arg("--pgdata")
            .arg(&foreign)
            .arg("--tablespace-map")
            .arg(format!("{oid}={}", moved.display()))
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("belongs to uid 65534"), "{err}");
        assert_eq!(std::fs::read_dir(&foreign).unwrap().count(), 0);
        let meta = std::fs::metadata(&foreign).unwrap();
        assert_eq!(
            meta.mode() & 0o777,
            0o777,
            "the refused directory was changed"
        );
    }
}

/// A chunk the manifest places past its pack's end is damage (exit 4), not
/// an I/O failure a retry could mend (exit 5).
#[test]
fn a_chunk_past_its_packs_end_is_damage() {
    let s = setup(&|root| RepoTarget::local(&root.join("repo")));
    chunk_past_pack_end(&s, &s.root().join("repo/packs"));
}

#[test]
fn a_chunk_past_its_packs_end_is_damage_on_s3() {
    let s3 = S3Server::start();
    let s = setup(&|_| s3.target("repo"));
    chunk_past_pack_end(&s, &s3.object_path("repo", "packs"));
}

fn chunk_past_pack_end(s: &Setup, packs: &Path) {
    s.primary
        .sql("CREATE TABLE t AS SELECT g FROM generate_series(1, 1000) g");
    s.backup();
    let largest = walkdir::WalkDir::new(packs)
        .into_iter()
        .map(|e| e.unwrap())
        .filter(|e| e.file_type().is_file() && e.path().extension().is_some_and(|x| x == "pack"))
        .max_by_key(|e| e.metadata().unwrap().len())
        .unwrap()
        .into_path();
    // Cut to nothing: every chunk of it now lies past its end (a cut inside a
    // chunk is already reported as damage).
    std::fs::write(&largest, b"").unwrap();
    let out = s.restore("short-pack", &["--jobs", "1"]);
    assert_eq!(out.status.code(), Some(4), "{}", describe(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    let pack = largest.file_name().unwrap().to_string_lossy();
    assert!(
        err.contains("is damaged in the repository")
            && err.contains(&format!("{pack}, which holds 0")),
        "{err}"
    );
}

/// A backup with a tablespace outside the data directory's parent drills:
/// the tablespace goes inside the drill's scratch directory, never back to
/// where the backed-up server kept it.
#[test]
fn a_backup_with_a_tablespace_drills_inside_its_scratch_directory() {
    let s = setup(&|root| RepoTarget::local(&root.join("repo")));
    let elsewhere = tempfile::Builder::new()
        .prefix("walvault-ts-")
        .tempdir()
        .unwrap();
    let ts = elsewhere.path().join("ts");
    std::fs::create_dir(&ts).unwrap();
    give_to_postgres(elsewhere.path());
    s.primary.sql(&format!(
        "CREATE TABLESPACE extra LOCATION '{}'",
        ts.display()
    ));
    s.primary
        .sql("CREATE TABLE t (batch int, id int) TABLESPACE extra");
    s.primary
        .sql("INSERT INTO t SELECT 1, g FROM generate_series(1, 5000) g");
    s.backup();
    let last = s.primary.switch_wal();
    s.primary.wait_archived(&last);
    let before: Vec<_> = std::fs::read_dir(&ts)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();

    let parent = shared_temp_folder();
    let (out, report) = drill_as_postgres(&s, parent.path());
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(report["check_sql_result"], "5000", "{report}");
    let after: Vec<_> = std::fs::read_dir(&ts)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(
        before, after,
        "the drill wrote into the original tablespace"
    );
    assert_eq!(std::fs::read_dir(parent.path()).unwrap().count(), 0);
}
