//! push/fetch through the real binary, on a filesystem repository and on a
//! real S3-compatible server, with synthetic but well-formed segments (the
//! PostgreSQL-driven tests are in archive_postgres.rs).

mod common;

use common::*;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const SEG: &str = "000000010000000000000003";
const MIB: u32 = 1 << 20;

struct Fixture {
    dir: tempfile::TempDir,
    bin: std::path::PathBuf,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let bin = install_binary(dir.path());
    Fixture { dir, bin }
}

impl Fixture {
    fn write(&self, name: &str, data: &[u8]) -> std::path::PathBuf {
        let p = self.dir.path().join("pg_wal").join(name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, data).unwrap();
        p
    }
    fn push(&self, repo: &RepoTarget, path: &Path, name: &str) -> std::process::Output {
        repo.walvault(&self.bin)
            .arg("push")
            .arg(path)
            .arg(name)
            .output()
            .unwrap()
    }
    fn fetch(&self, repo: &RepoTarget, name: &str, dest: &Path) -> std::process::Output {
        repo.walvault(&self.bin)
            .arg("fetch")
            .arg(name)
            .arg(dest)
            .output()
            .unwrap()
    }
}

fn round_trip_every_kind(repo: &RepoTarget) {
    let f = fixture();
    let files: Vec<(String, Vec<u8>)> = vec![
        (SEG.into(), synthetic_segment(SEG, 7, MIB, 0)),
        (
            "000000010000000000000004.partial".into(),
            synthetic_segment("000000010000000000000004", 7, MIB, 1),
        ),
        (
            "00000002.history".into(),
            b"1\t0/4000000\tno recovery target specified\n".to_vec(),
        ),
        (
            "000000010000000000000003.00000028.backup".into(),
            b"START WAL LOCATION: 0/3000028 (file 000000010000000000000003)\n".to_vec(),
        ),
    ];
    for (name, data) in &files {
        let p = f.write(name, data);
        let out = f.push(repo, &p, name);
        assert!(out.status.success(), "push {name}: {}", describe(&out));
    }
    for (name, data) in &files {
        let dest = f.dir.path().join("restored").join(name);
        std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
        let out = f.fetch(repo, name, &dest);
        assert!(out.status.success(), "fetch {name}: {}", describe(&out));
        assert_eq!(
            &std::fs::read(&dest).unwrap(),
            data,
            "{name} came back different"
        );
    }
}

fn duplicates(repo: &RepoTarget, stored_object: &dyn Fn() -> Vec<u8>) {
    let f = fixture();
    let original = synthetic_segment(SEG, 7, MIB, 0);
    let p = f.write(SEG, &original);
    assert!(f.push(repo, &p, SEG).status.success());
    let stored = stored_object();

    // Identical bytes again (a crash made PostgreSQL retry): success.
    let out = f.push(repo, &p, SEG);
    assert!(out.status.success(), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("identical"),
        "{}",
        describe(&out)
    );

    // Different bytes under the same name: refused, stored copy untouched.
    let other = f.write("other", &synthetic_segment(SEG, 7, MIB, 0x5a));
    let out = f.push(repo, &other, SEG);
    assert_eq!(out.status.code(), Some(3), "{}", describe(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("different content") && err.contains("sha256"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    assert_eq!(stored_object(), stored, "stored object changed");

    // A segment of another cluster: refused, naming both identifiers.
    let foreign_name = "000000010000000000000005";
    let foreign = f.write(foreign_name, &synthetic_segment(foreign_name, 99, MIB, 0));
    let out = f.push(repo, &foreign, foreign_name);
    assert_eq!(out.status.code(), Some(3), "{}", describe(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(" 7 ") && err.contains(" 99"), "{err}");
    let dest = f.dir.path().join("fetched");
    assert_eq!(f.fetch(repo, foreign_name, &dest).status.code(), Some(1));

    let out = f.fetch(repo, SEG, &dest);
    assert!(out.status.success());
    assert_eq!(std::fs::read(&dest).unwrap(), original);
}

fn missing_is_quiet_exit_1(repo: &RepoTarget) {
    let f = fixture();
    let p = f.write(SEG, &synthetic_segment(SEG, 7, MIB, 0));
    assert!(f.push(repo, &p, SEG).status.success());
    for name in ["00000002.history", "000000010000000000000004"] {
        let dest = f.dir.path().join("RECOVERYXLOG");
        let out = f.fetch(repo, name, &dest);
        assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
        assert!(out.stderr.is_empty(), "not quiet: {}", describe(&out));
        assert!(!dest.exists());
    }
}

fn s3_target(s3: &S3Server, prefix: &str) -> RepoTarget {
    s3.target(prefix)
}

#[test]
fn fs_round_trip_every_kind() {
    let d = tempfile::tempdir().unwrap();
    round_trip_every_kind(&RepoTarget::local(&d.path().join("repo")));
}

#[test]
fn s3_round_trip_every_kind() {
    let s3 = S3Server::start();
    round_trip_every_kind(&s3_target(&s3, "cluster-a"));
}

#[test]
fn fs_duplicate_and_foreign_pushes_are_settled() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path().join("repo");
    let obj = root.join("wal/0000000100000000").join(format!("{SEG}.zst"));
    duplicates(&RepoTarget::local(&root), &|| std::fs::read(&obj).unwrap());
}

#[test]
fn s3_duplicate_and_foreign_pushes_are_settled() {
    let s3 = S3Server::start();
    let obj = s3.object_path("p", &format!("wal/0000000100000000/{SEG}.zst"));
    duplicates(&s3_target(&s3, "p"), &|| std::fs::read(&obj).unwrap());
}

#[test]
fn fs_missing_file_is_a_quiet_exit_1() {
    let d = tempfile::tempdir().unwrap();
    missing_is_quiet_exit_1(&RepoTarget::local(&d.path().join("repo")));
}

#[test]
fn s3_missing_file_is_a_quiet_exit_1() {
    let s3 = S3Server::start();
    missing_is_quiet_exit_1(&s3_target(&s3, "x"));
}

#[test]
fn bad_names_are_refused_before_touching_the_repository() {
    let f = fixture();
    let root = f.dir.path().join("repo");
    let repo = RepoTarget::local(&root);
    let p = f.write(SEG, &synthetic_segment(SEG, 7, MIB, 0));
    for bad in [
        "../000000010000000000000003",
        "pg_wal/x",
        "00000001000000000000003",
        "0000000100000000000000zz",
        "",
    ] {
        let out = f.push(&repo, &p, bad);
        assert_eq!(out.status.code(), Some(2), "{bad}: {}", describe(&out));
        assert!(String::from_utf8_lossy(&out.stderr).contains("not a PostgreSQL WAL file name"));
        let out = f.fetch(&repo, bad, &f.dir.path().join("out"));
        assert_eq!(out.status.code(), Some(2), "{bad}: {}", describe(&out));
    }
    assert!(!root.exists(), "repository was touched");
}

#[test]
fn segments_whose_header_disagrees_are_refused() {
    let f = fixture();
    let root = f.dir.path().join("repo");
    let repo = RepoTarget::local(&root);
    // Named 3, but its header says it is segment 4.
    let p = f.write(
        SEG,
        &synthetic_segment("000000010000000000000004", 7, MIB, 0),
    );
    let out = f.push(&repo, &p, SEG);
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    // Not WAL at all.
    let p = f.write("junk", &vec![0u8; MIB as usize]);
    let out = f.push(&repo, &p, SEG);
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    // Truncated.
    let p = f.write("short", &synthetic_segment(SEG, 7, MIB, 0)[..100_000]);
    let out = f.push(&repo, &p, SEG);
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    assert!(!root.join("wal").exists());
}

#[test]
fn a_damaged_object_is_never_handed_over() {
    let f = fixture();
    let root = f.dir.path().join("repo");
    let obj = root.join("wal/0000000100000000").join(format!("{SEG}.zst"));
    damaged_objects_are_never_handed_over(&f, &RepoTarget::local(&root), &obj);
}

#[test]
fn s3_damaged_object_is_never_handed_over() {
    let f = fixture();
    let s3 = S3Server::start();
    let obj = s3.object_path("d", &format!("wal/0000000100000000/{SEG}.zst"));
    damaged_objects_are_never_handed_over(&f, &s3_target(&s3, "d"), &obj);
}

/// Flipped, truncated and extended objects (at `obj`, the file behind the
/// store) fail with exit 4 and leave the destination untouched; the
/// archiver pushing the true content again repairs the damage.
fn damaged_objects_are_never_handed_over(f: &Fixture, repo: &RepoTarget, obj: &std::path::Path) {
    let p = f.write(SEG, &synthetic_segment(SEG, 7, MIB, 0));
    assert!(f.push(repo, &p, SEG).status.success());
    let good = std::fs::read(obj).unwrap();
    let mut flipped = good.clone();
    flipped[good.len() / 2] ^= 0x01;
    let mut extended = good.clone();
    extended.extend_from_slice(&good[good.len() - 100..]);

    let dest = f.dir.path().join("RECOVERYXLOG");
    std::fs::write(&dest, b"previous").unwrap();
    for (what, bytes) in [
        ("a flipped bit", &flipped[..]),
        ("a truncated object", &good[..good.len() - 1000]),
        ("an object cut after its header", &good[..60]),
        ("bytes after the last frame", &extended[..]),
    ] {
        std::fs::write(obj, bytes).unwrap();
        let out = f.fetch(repo, SEG, &dest);
        assert_eq!(out.status.code(), Some(4), "{what}: {}", describe(&out));
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("damaged"),
            "{what}"
        );
        assert_eq!(
            std::fs::read(&dest).unwrap(),
            b"previous",
            "{what}: destination was touched"
        );
    }

    // Longer than any object of a history file can be: refused unread.
    let history = obj
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("00000002.history.zst");
    std::fs::write(&history, vec![0x5a; 17 << 20]).unwrap();
    let out = f.fetch(repo, "00000002.history", &dest);
    assert_eq!(out.status.code(), Some(4), "{}", describe(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("more than any object"));
    assert_eq!(std::fs::read(&dest).unwrap(), b"previous");

    std::fs::write(obj, &flipped).unwrap();
    let out = f.push(repo, &p, SEG);
    assert!(out.status.success(), "{}", describe(&out));
    assert!(f.fetch(repo, SEG, &dest).status.success());
    assert_eq!(std::fs::read(&dest).unwrap(), std::fs::read(&p).unwrap());
}

#[test]
fn wrong_repository_is_a_clear_error() {
    let f = fixture();
    let dest = f.dir.path().join("out");
    for (url, needle) in [
        ("/nonexistent/walvault/repo", "does not exist"),
        ("relative/repo", "relative path"),
        ("gs://bucket/x", "unsupported repository URL scheme"),
    ] {
        let out = Command::new(&f.bin)
            .args(["--repo", url, "fetch", SEG])
            .arg(&dest)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{url}: {}", describe(&out));
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(needle),
            "{url}: {}",
            describe(&out)
        );
    }
    // An existing directory that holds no repository is not "end of archive".
    let empty = f.dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let out = f.fetch(&RepoTarget::local(&empty), SEG, &dest);
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no walvault repository"));
    // No repository given at all.
    let out = Command::new(&f.bin)
        .env_remove("WALVAULT_REPO")
        .args(["fetch", SEG])
        .arg(&dest)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
}

#[test]
fn repo_option_works_after_the_subcommand_and_from_the_environment() {
    let f = fixture();
    let root = f.dir.path().join("repo");
    let p = f.write(SEG, &synthetic_segment(SEG, 7, MIB, 0));
    let out = Command::new(&f.bin)
        .arg("push")
        .arg(&p)
        .arg(SEG)
        .arg("--repo")
        .arg(&root)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", describe(&out));
    let dest = f.dir.path().join("out");
    let out = Command::new(&f.bin)
        .env("WALVAULT_REPO", &root)
        .arg("fetch")
        .arg(SEG)
        .arg(&dest)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", describe(&out));
}

#[test]
fn s3_credentials_never_appear_in_output() {
    let s3 = S3Server::start();
    let f = fixture();
    let mut repo = s3_target(&s3, "creds");
    // Wrong secret: the request fails, the error names what failed, not the secret.
    for (k, v) in repo.env.iter_mut() {
        if k == "AWS_SECRET_ACCESS_KEY" {
            *v = "not-the-secret-but-still-private".into();
        }
    }
    let p = f.write(SEG, &synthetic_segment(SEG, 7, MIB, 0));
    let out = f.push(&repo, &p, SEG);
    assert!(!out.status.success());
    assert!(
        (1..=125).contains(&out.status.code().unwrap()),
        "{}",
        describe(&out)
    );
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!all.contains("not-the-secret-but-still-private"), "{all}");
    assert!(!all.contains(S3_SECRET_KEY), "{all}");
    assert!(all.contains("walvault: error:"), "{all}");
}

/// kill -9 at many points of a push: the final name holds either nothing or
/// a complete object, and the next push succeeds.
#[test]
fn killed_push_leaves_nothing_half_written() {
    let f = fixture();
    let root = f.dir.path().join("repo");
    let repo = RepoTarget::local(&root);
    // 64 MiB of poorly compressible content makes a push last long enough to hit.
    let size = 64 * MIB;
    let mut seg = synthetic_segment(SEG, 7, size, 0);
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for b in seg[8192..].iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    let p = f.write(SEG, &seg);
    let obj = root.join("wal/0000000100000000").join(format!("{SEG}.zst"));

    let started = Instant::now();
    assert!(f.push(&repo, &p, SEG).status.success());
    let full = started.elapsed();
    std::fs::remove_file(&obj).unwrap();

    for step in 1..=9u32 {
        let mut cmd = repo.walvault(&f.bin);
        let mut child = cmd
            .arg("push")
            .arg(&p)
            .arg(SEG)
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(full * step / 10);
        let _ = child.kill(); // SIGKILL
        let _ = child.wait();
        if obj.exists() {
            // Only a complete, verifiable object may carry the final name.
            let dest = f.dir.path().join("check");
            let out = f.fetch(&repo, SEG, &dest);
            assert!(
                out.status.success(),
                "after kill at {step}/10: {}",
                describe(&out)
            );
            assert_eq!(std::fs::read(&dest).unwrap(), seg);
            std::fs::remove_file(&obj).unwrap();
        }
        let out = f.push(&repo, &p, SEG);
        assert!(
            out.status.success(),
            "push after kill at {step}/10: {}",
            describe(&out)
        );
        std::fs::remove_file(&obj).unwrap();
    }
    let _ = Duration::ZERO;
}

/// `push` as PostgreSQL calls it for `name` in `wal`, with a push-ahead window.
fn push_from_pg_wal(
    f: &Fixture,
    repo: &RepoTarget,
    wal: &std::path::Path,
    name: &str,
    window: usize,
) -> std::process::Output {
    repo.walvault(&f.bin)
        .args(["push", "--push-ahead", &window.to_string()])
        .arg(wal.join(name))
        .arg(name)
        .output()
        .unwrap()
}

/// A pg_wal directory with `.ready` files, as PostgreSQL leaves it.
fn pg_wal_with_ready(f: &Fixture, names: &[&str], fill: u8) -> std::path::PathBuf {
    let wal = f.dir.path().join("data/pg_wal");
    std::fs::create_dir_all(wal.join("archive_status")).unwrap();
    for name in names {
        std::fs::write(wal.join(name), synthetic_segment(name, 7, MIB, fill)).unwrap();
        std::fs::write(
            wal.join("archive_status").join(format!("{name}.ready")),
            b"",
        )
        .unwrap();
    }
    wal
}

/// Three segments PostgreSQL has marked ready, and a local repository.
const BACKLOG: [&str; 3] = [
    "000000010000000000000003",
    "000000010000000000000004",
    "000000010000000000000005",
];

/// The repository's directory, its target, and a pg_wal holding [`BACKLOG`].
fn backlog(f: &Fixture) -> (std::path::PathBuf, RepoTarget, std::path::PathBuf) {
    let root = f.dir.path().join("repo");
    let repo = RepoTarget::local(&root);
    let wal = pg_wal_with_ready(f, &BACKLOG, 0);
    (root, repo, wal)
}

#[test]
fn push_ahead_records_never_outlive_a_changed_file() {
    let f = fixture();
    let (root, repo, wal) = backlog(&f);
    let names = BACKLOG;
    let out = push_from_pg_wal(&f, &repo, &wal, names[0], 8);
    assert!(out.status.success(), "{}", describe(&out));
    // The others are pushed by a background worker, which logs to the spool.
    let spool = wal.join("walvault-spool");
    wait_for_spool_workers(&spool);
    let log = std::fs::read_to_string(spool.join("push-worker.log")).unwrap();
    assert!(log.contains("pushed 2 segments ahead"), "{log}");
    for n in &names[1..] {
        assert!(
            root.join(format!("wal/0000000100000000/{n}.zst")).exists(),
            "{n} not pushed ahead"
        );
    }
    // Unchanged: the next call is answered from the record.
    let out = f.push(&repo, &wal.join(names[1]), names[1]);
    assert!(out.status.success(), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("archived ahead; verified unchanged"),
        "{}",
        describe(&out)
    );
    // Changed since (same size, other bytes): the record is worthless, the
    // real comparison runs and refuses.
    std::fs::write(
        wal.join(names[2]),
        synthetic_segment(names[2], 7, MIB, 0x33),
    )
    .unwrap();
    let out = f.push(&repo, &wal.join(names[2]), names[2]);
    assert_eq!(out.status.code(), Some(3), "{}", describe(&out));
}

#[test]
fn settled_records_are_proven_by_metadata_and_still_catch_changes() {
    let f = fixture();
    let (_, repo, wal) = backlog(&f);
    let names = BACKLOG;
    // Written well before they are read, as a backlog is.
    std::thread::sleep(Duration::from_millis(2200));
    let push = |name: &str| push_from_pg_wal(&f, &repo, &wal, name, 8);
    assert!(push(names[0]).status.success());
    wait_for_spool_workers(&wal.join("walvault-spool"));
    let out = push(names[1]);
    assert!(out.status.success(), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("verified unchanged by its metadata"),
        "{}",
        describe(&out)
    );
    // Other bytes, same size, and the old mtime put back: ctime still
    // tells, and the real comparison runs and refuses.
    let path = wal.join(names[2]);
    let mtime = std::fs::metadata(&path).unwrap().modified().unwrap();
    std::fs::write(&path, synthetic_segment(names[2], 7, MIB, 0x33)).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&path)
        .unwrap()
        .set_modified(mtime)
        .unwrap();
    let out = push(names[2]);
    assert_eq!(out.status.code(), Some(3), "{}", describe(&out));
}

/// Segment names of timeline 1, log 0, for segment numbers `range`.
fn segment_names(range: std::ops::Range<u32>) -> Vec<String> {
    range
        .map(|i| format!("0000000100000000000000{i:02X}"))
        .collect()
}

/// Processes whose command line contains `needle`, as pids.
fn pids_with(needle: &str) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let pid: i32 = e.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
            String::from_utf8_lossy(&cmdline)
                .contains(needle)
                .then_some(pid)
        })
        .collect()
}

/// A push-ahead worker killed at any point blocks nothing: its lock goes
/// with it, and PostgreSQL's own calls archive every segment exactly.
#[test]
fn a_killed_push_worker_blocks_nothing() {
    let f = fixture();
    let root = f.dir.path().join("repo");
    let repo = RepoTarget::local(&root);
    let names = segment_names(3..27);
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let wal = pg_wal_with_ready(&f, &refs, 9);
    let spool = wal.join("walvault-spool");
    // With a small window, so the worker has work left.
    let push = |n: &str| push_from_pg_wal(&f, &repo, &wal, n, 2);
    let out = push(&names[0]);
    assert!(out.status.success(), "{}", describe(&out));
    let needle = spool.to_string_lossy().to_string();
    let workers = pids_with(&needle);
    assert!(workers.len() <= 1, "more than one worker: {workers:?}");
    for pid in workers {
        // The worker runs behind PostgreSQL (operations.md): nice 10. The
        // field after the command name's closing parenthesis is the 3rd of
        // /proc/PID/stat; nice is the 19th.
        if let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
            assert_eq!(fields[16], "10", "nice of the push worker: {stat}");
        }
        let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
    }
    wait_for_spool_workers(&spool);
    // PostgreSQL goes on calling push in order, as if nothing happened.
    for n in &names[1..] {
        let out = push(n);
        assert!(out.status.success(), "{n}: {}", describe(&out));
        std::fs::rename(
            wal.join("archive_status").join(format!("{n}.ready")),
            wal.join("archive_status").join(format!("{n}.done")),
        )
        .unwrap();
    }
    wait_for_spool_workers(&spool);
    let dest = f.dir.path().join("back");
    for n in &names {
        let out = f.fetch(&repo, n, &dest);
        assert!(out.status.success(), "{n}: {}", describe(&out));
        assert_eq!(
            std::fs::read(&dest).unwrap(),
            std::fs::read(wal.join(n)).unwrap(),
            "{n} differs"
        );
    }
}

#[test]
fn prefetch_serves_verified_local_copies() {
    let f = fixture();
    let root = f.dir.path().join("repo");
    let repo = RepoTarget::local(&root);
    let names = segment_names(3..13);
    let mut originals = vec![];
    for n in &names {
        let data = synthetic_segment(n, 7, MIB, 1);
        let p = f.write(n, &data);
        let out = repo
            .walvault(&f.bin)
            .args(["push", "--push-ahead", "0"])
            .arg(&p)
            .arg(n)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", describe(&out));
        originals.push(data);
    }
    let wal = f.dir.path().join("standby/pg_wal");
    std::fs::create_dir_all(&wal).unwrap();
    let dest = wal.join("RECOVERYXLOG");
    // Called by a standby (prefetching serves recovery only).
    std::fs::write(wal.parent().unwrap().join("standby.signal"), b"").unwrap();
    let fetch = |name: &str| {
        repo.walvault(&f.bin)
            .current_dir(wal.parent().unwrap())
            .args(["fetch", "--prefetch", "4", name])
            .arg(&dest)
            .output()
            .unwrap()
    };
    let out = fetch(&names[0]);
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(std::fs::read(&dest).unwrap(), originals[0]);
    // The next ones are downloaded by a background worker.
    wait_for_spool_workers(&wal.join("walvault-spool"));
    let spooled = || -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(wal.join("walvault-spool/prefetch"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap()[..24].to_string())
            .collect();
        v.sort();
        v
    };
    assert_eq!(spooled(), names[1..5]);

    // The next ones come from the spool: gone from the repository, still served.
    let object = |n: &str| root.join(format!("wal/0000000100000000/{n}.zst"));
    let saved = std::fs::read(object(&names[1])).unwrap();
    std::fs::remove_file(object(&names[1])).unwrap();
    let out = fetch(&names[1]);
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(std::fs::read(&dest).unwrap(), originals[1]);
    std::fs::write(object(&names[1]), saved).unwrap();

    // A damaged spooled copy is never handed over.
    let spool = wal.join("walvault-spool/prefetch");
    let damaged = std::fs::read_dir(&spool)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .starts_with(&names[2])
        })
        .unwrap();
    let mut bytes = std::fs::read(&damaged).unwrap();
    bytes[5000] ^= 1;
    std::fs::write(&damaged, bytes).unwrap();
    std::fs::remove_file(object(&names[2])).unwrap();
    std::fs::remove_file(&dest).unwrap();
    let out = fetch(&names[2]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(!dest.exists(), "a damaged copy was handed over");

    // Another timeline: everything spooled for timeline 1 goes.
    let out = fetch("000000020000000000000009");
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert_eq!(spooled(), Vec::<String>::new());
}

/// push exits 0 only after the object is durable: the staged file is
/// fsynced, linked to its final name (which fails if the name exists), and
/// the directory fsynced, in that order. Watched with strace.
#[test]
fn push_fsyncs_file_then_directory_before_exiting() {
    let f = fixture();
    let root = f.dir.path().join("repo");
    let p = f.write(SEG, &synthetic_segment(SEG, 7, MIB, 0));
    let trace = f.dir.path().join("trace.txt");
    let out = Command::new("strace")
        .args([
            "-f",
            "-e",
            "trace=openat,fsync,fdatasync,linkat,renameat,renameat2,rename",
            "-o",
        ])
        .arg(&trace)
        .arg(&f.bin)
        .arg("--repo")
        .arg(&root)
        .arg("push")
        .arg(&p)
        .arg(SEG)
        .output()
        .expect("strace is needed for this test: run 'make setup'");
    assert!(out.status.success(), "{}", describe(&out));
    let final_path = root.join("wal/0000000100000000").join(format!("{SEG}.zst"));
    let final_path = final_path.to_str().unwrap();
    let dir = root.join("wal/0000000100000000");
    let dir = format!("\"{}\"", dir.to_str().unwrap());
    let text = std::fs::read_to_string(&trace).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    // A call another thread interrupted shows as "<unfinished ...>" and its
    // result on a later "resumed" line: read the fd from whichever has it.
    let fd_of = |i: usize| -> String {
        let pid = lines[i].split_whitespace().next().unwrap();
        let line = if lines[i].contains("<unfinished") {
            lines[i..]
                .iter()
                .find(|l| l.starts_with(pid) && l.contains("openat resumed"))
                .unwrap()
        } else {
            lines[i]
        };
        line.rsplit("= ").next().unwrap().trim().to_string()
    };
    // The staged file: created exclusively next to the final name.
    let staged = lines
        .iter()
        .position(|l| {
            l.contains("openat(")
                && l.contains(&format!("{final_path}#"))
                && l.contains("O_EXCL")
                && !l.contains("= -1")
        })
        .expect("no staged file");
    let staged_fd = fd_of(staged);
    let fsync_file = (staged..lines.len())
        .find(|&i| lines[i].contains(&format!("fsync({staged_fd}")))
        .expect("staged file never fsynced");
    let link = (fsync_file..lines.len())
        .find(|&i| lines[i].contains("linkat(") && lines[i].contains(&format!("\"{final_path}\"")))
        .expect("never linked to its final name after the fsync");
    let open_dir = (link..lines.len())
        .find(|&i| lines[i].contains("openat(") && lines[i].contains(&dir))
        .expect("directory never opened after the link");
    let dir_fd = fd_of(open_dir);
    (open_dir..lines.len())
        .find(|&i| lines[i].contains(&format!("fsync({dir_fd}")))
        .expect("directory never fsynced after the link");
}

/// Promises of the command line that need no server.
#[test]
fn cli_keeps_secrets_and_refuses_contradictions() {
    let f = fixture();
    // A password in WALVAULT_DBNAME never shows in help.
    let out = Command::new(&f.bin)
        .env(
            "WALVAULT_DBNAME",
            "postgresql://app:S3cr3tPw@db.internal/app",
        )
        .args(["backup", "--help"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", describe(&out));
    assert!(!String::from_utf8_lossy(&out.stdout).contains("S3cr3tPw"));
    // A standby follows its primary: a recovery target makes no sense.
    let repo = RepoTarget::local(&f.dir.path().join("repo"));
    let dest = f.dir.path().join("standby");
    let out = repo
        .walvault(&f.bin)
        .args(["restore", "--standby", "--lsn", "0/3000000", "--pgdata"])
        .arg(&dest)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("takes no recovery target"));
    assert!(!dest.exists());
}

/// A relay on 127.0.0.1 to a server that cuts the first `cuts` connections
/// to carry `after` bytes of response, once they have: a connection to the
/// store dropping mid-body (a small request beside it, on a connection of
/// its own, goes through whole).
struct CuttingRelay {
    port: u16,
    cut: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Joins every connection's thread once told to stop.
    accepter: Option<std::thread::JoinHandle<()>>,
}

impl CuttingRelay {
    fn start(upstream: u16, cuts: usize, after: usize) -> CuttingRelay {
        use std::io::{Read, Write};
        use std::net::{Shutdown, TcpListener, TcpStream};
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
        let listener = TcpListener::bind(("127.0.0.1", 0)).unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let cut = std::sync::Arc::new(AtomicUsize::new(0));
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let (cut2, stop2) = (cut.clone(), stop.clone());
        let accepter = std::thread::spawn(move || {
            let mut connections = vec![];
            while !stop2.load(Ordering::SeqCst) {
                let client = match listener.accept() {
                    Ok((client, _)) => client,
                    Err(_) => {
                        std::thread::sleep(Duration::from_millis(5));
                        continue;
                    }
                };
                client.set_nonblocking(false).unwrap();
                let cut = cut2.clone();
                connections.push(std::thread::spawn(move || {
                    let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else {
                        return;
                    };
                    let (mut c_in, mut s_out) =
                        (client.try_clone().unwrap(), server.try_clone().unwrap());
                    // Requests go through as they come; each side's end ends the other.
                    let requests = std::thread::spawn(move || {
                        let _ = std::io::copy(&mut c_in, &mut s_out);
                        let _ = s_out.shutdown(Shutdown::Write);
                    });
                    let (mut server, mut client) = (server, client);
                    let mut sent = 0usize;
                    let mut buf = vec![0u8; 16 << 10];
                    loop {
                        let n = match server.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        // Crossing `after` claims one of the cuts, while any is left.
                        let cutting = sent + n >= after
                            && cut
                                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |c| {
                                    (c < cuts).then_some(c + 1)
                                })
                                .is_ok();
                        let n = if cutting { after - sent } else { n };
                        if client.write_all(&buf[..n]).is_err() {
                            break;
                        }
                        sent += n;
                        if cutting {
                            break;
                        }
                    }
                    let _ = client.shutdown(Shutdown::Both);
                    let _ = server.shutdown(Shutdown::Both);
                    let _ = requests.join();
                }));
            }
            // Each ends when either side closes: walvault has exited by now.
            for c in connections {
                let _ = c.join();
            }
        });
        CuttingRelay {
            port,
            cut,
            stop,
            accepter: Some(accepter),
        }
    }
}

impl Drop for CuttingRelay {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(a) = self.accepter.take() {
            let _ = a.join();
        }
    }
}

#[test]
fn a_connection_cut_mid_object_is_resumed_and_still_proven() {
    let f = fixture();
    let s3 = S3Server::start();
    let repo = s3_target(&s3, "cut");
    // Incompressible after the header, so the object is about 8 MiB of eight
    // frames and the cut falls inside the first.
    let mut segment = synthetic_segment(SEG, 7, 8 * MIB, 0);
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for b in &mut segment[64..] {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    let p = f.write(SEG, &segment);
    assert!(f.push(&repo, &p, SEG).status.success());

    let relay = CuttingRelay::start(s3.port, 1, 256 << 10);
    let mut through_relay = repo.clone();
    for (k, v) in &mut through_relay.env {
        if k == "AWS_ENDPOINT_URL" {
            *v = format!("http://127.0.0.1:{}", relay.port);
        }
    }
    let dest = f.dir.path().join("RECOVERYXLOG");
    std::fs::write(&dest, b"previous").unwrap();
    // Bounded: a fetch that hangs after the cut fails the test, not the suite.
    let mut child = through_relay
        .walvault(&f.bin)
        .arg("fetch")
        .arg(SEG)
        .arg(&dest)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let since = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if since.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            panic!("fetch still running 60 s after a cut connection");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        relay.cut.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "the relay cut nothing"
    );
    // The store's client asks again for the rest (a Range request), and the
    // whole object is still proven before it is handed over.
    assert!(out.status.success(), "{}", describe(&out));
    assert!(
        std::fs::read(&dest).unwrap() == segment,
        "wrong bytes handed over"
    );
    let leftovers: Vec<_> = std::fs::read_dir(f.dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}
