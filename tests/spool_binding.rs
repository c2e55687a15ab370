//! The spool speaks for one repository only: a push-ahead record proves a
//! segment stored only in the repository it was made for, a prefetched copy
//! is handed over only by a fetch from the repository it came from, and the
//! spool is only ever a shortcut (a copy it cannot hand over is fetched from
//! the repository instead). Real binary, synthetic well-formed segments.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::Output;

const MIB: u32 = 1 << 20;

struct Fixture {
    dir: tempfile::TempDir,
    bin: PathBuf,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let bin = install_binary(dir.path());
    Fixture { dir, bin }
}

/// Segment names of timeline 1, log 0, for segment numbers `range`.
fn segment_names(range: std::ops::Range<u32>) -> Vec<String> {
    range
        .map(|i| format!("0000000100000000000000{i:02X}"))
        .collect()
}

fn object_in(root: &Path, name: &str) -> PathBuf {
    root.join(format!("wal/0000000100000000/{name}.zst"))
}

impl Fixture {
    fn repo(&self, name: &str) -> (PathBuf, RepoTarget) {
        let root = self.dir.path().join(name);
        let target = RepoTarget::local(&root);
        (root, target)
    }

    /// A pg_wal directory holding `names` (cluster 7), each marked `.ready`
    /// as PostgreSQL leaves them.
    fn pg_wal_with_ready(&self, names: &[String]) -> PathBuf {
        let wal = self.dir.path().join("data/pg_wal");
        std::fs::create_dir_all(wal.join("archive_status")).unwrap();
        for name in names {
            std::fs::write(wal.join(name), synthetic_segment(name, 7, MIB, 0)).unwrap();
            std::fs::write(wal.join(format!("archive_status/{name}.ready")), b"").unwrap();
        }
        wal
    }

    /// `push` as PostgreSQL calls it, from pg_wal, with a push-ahead window.
    fn push(&self, repo: &RepoTarget, wal: &Path, name: &str, window: usize) -> Output {
        repo.walvault(&self.bin)
            .args(["push", "--push-ahead", &window.to_string()])
            .arg(wal.join(name))
            .arg(name)
            .output()
            .unwrap()
    }

    /// Pushes synthetic segments of cluster `sysid` (content varied by
    /// `fill`) into `repo` from a scratch folder (no spool), and returns them.
    fn archive(&self, repo: &RepoTarget, names: &[String], sysid: u64, fill: u8) -> Vec<Vec<u8>> {
        let src = self.dir.path().join(format!("src-{sysid}-{fill}"));
        std::fs::create_dir_all(&src).unwrap();
        names
            .iter()
            .map(|n| {
                let data = synthetic_segment(n, sysid, MIB, fill);
                std::fs::write(src.join(n), &data).unwrap();
                let out = repo
                    .walvault(&self.bin)
                    .args(["push", "--push-ahead", "0"])
                    .arg(src.join(n))
                    .arg(n)
                    .output()
                    .unwrap();
                assert!(out.status.success(), "{n}: {}", describe(&out));
                data
            })
            .collect()
    }

    /// `fetch` as recovery calls it, into `wal/RECOVERYXLOG`.
    fn fetch(&self, repo: &RepoTarget, wal: &Path, name: &str, extra: &[&str]) -> Output {
        // By a standby: prefetching serves recovery only.
        let data = wal.parent().unwrap();
        std::fs::write(data.join("standby.signal"), b"").unwrap();
        repo.walvault(&self.bin)
            .current_dir(data)
            .args(["fetch", "--prefetch", "4"])
            .args(extra)
            .arg(name)
            .arg(wal.join("RECOVERYXLOG"))
            .output()
            .unwrap()
    }
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).to_string()
}

/// Finding 2: `--repo B push --push-ahead 8` with a backlog leaves records
/// that once answered `--repo A push` too, which then exited 0 with A
/// holding nothing. Now a record counts only for the repository it names,
/// and a repository recreated at the same place is another one.
#[test]
fn a_push_record_proves_nothing_for_another_repository() {
    let f = fixture();
    let names = segment_names(3..6);
    let wal = f.pg_wal_with_ready(&names);
    let (root_a, repo_a) = f.repo("repo-a");
    let (root_b, repo_b) = f.repo("repo-b");

    let out = f.push(&repo_b, &wal, &names[0], 8);
    assert!(out.status.success(), "{}", describe(&out));
    let spool = wal.join("walvault-spool");
    wait_for_spool_workers(&spool);
    let log = std::fs::read_to_string(spool.join("push-worker.log")).unwrap();
    assert!(log.contains("pushed 2 segments ahead"), "{log}");

    // Into A, which has never seen it: a real push.
    let out = f.push(&repo_a, &wal, &names[1], 0);
    assert!(out.status.success(), "{}", describe(&out));
    assert!(
        !stderr(&out).contains("archived ahead"),
        "{}",
        describe(&out)
    );
    assert!(
        object_in(&root_a, &names[1]).exists(),
        "A holds nothing for {}: {}",
        names[1],
        describe(&out)
    );
    let back = f.dir.path().join("back");
    let out = repo_a
        .walvault(&f.bin)
        .arg("fetch")
        .arg(&names[1])
        .arg(&back)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(
        std::fs::read(&back).unwrap(),
        std::fs::read(wal.join(&names[1])).unwrap()
    );

    // Into B, for which it was made: the record still answers.
    let out = f.push(&repo_b, &wal, &names[1], 0);
    assert!(out.status.success(), "{}", describe(&out));
    assert!(
        stderr(&out).contains("archived ahead; verified unchanged"),
        "{}",
        describe(&out)
    );

    // B emptied and recreated at the same path (a mount gone and remade):
    // another repository, which the old records prove nothing about.
    std::fs::remove_dir_all(&root_b).unwrap();
    let out = f.push(&repo_b, &wal, &names[0], 0);
    assert!(out.status.success(), "{}", describe(&out));
    let out = f.push(&repo_b, &wal, &names[2], 0);
    assert!(out.status.success(), "{}", describe(&out));
    assert!(
        !stderr(&out).contains("archived ahead"),
        "{}",
        describe(&out)
    );
    assert!(
        object_in(&root_b, &names[2]).exists(),
        "the recreated B holds nothing for {}",
        names[2]
    );
}

/// Finding 9: prefetched copies were bound to name and sha256 only, so a
/// spool shared by two repositories handed one cluster the other's segment.
#[test]
fn prefetched_copies_serve_only_their_own_repository() {
    let f = fixture();
    let names = segment_names(3..9);
    let (_, repo_a) = f.repo("repo-a");
    let (_, repo_b) = f.repo("repo-b");
    let ours_a = f.archive(&repo_a, &names, 7, 1);
    let ours_b = f.archive(&repo_b, &names, 8, 2);
    let wal = f.dir.path().join("standby/pg_wal");
    std::fs::create_dir_all(&wal).unwrap();

    let out = f.fetch(&repo_a, &wal, &names[0], &[]);
    assert!(out.status.success(), "{}", describe(&out));
    wait_for_spool_workers(&wal.join("walvault-spool"));
    let spooled = std::fs::read_dir(wal.join("walvault-spool/prefetch"))
        .unwrap()
        .count();
    assert_eq!(spooled, 4, "A's next segments are spooled");

    // B's recovery, through the same spool, gets B's segment.
    let out = f.fetch(&repo_b, &wal, &names[1], &[]);
    assert!(out.status.success(), "{}", describe(&out));
    let got = std::fs::read(wal.join("RECOVERYXLOG")).unwrap();
    assert!(got != ours_a[1], "B's recovery was handed A's segment");
    assert_eq!(got, ours_b[1]);
    wait_for_spool_workers(&wal.join("walvault-spool"));

    // And A's recovery still gets A's.
    let out = f.fetch(&repo_a, &wal, &names[2], &[]);
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(std::fs::read(wal.join("RECOVERYXLOG")).unwrap(), ours_a[2]);
    wait_for_spool_workers(&wal.join("walvault-spool"));
}

/// The copy of `name` in the spool's prefetch folder.
fn spooled_copy(spool: &Path, name: &str) -> PathBuf {
    std::fs::read_dir(spool.join("prefetch"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.file_name().unwrap().to_str().unwrap().starts_with(name))
        .unwrap_or_else(|| panic!("{name} is not spooled"))
}

/// Finding 9 and finding 1's hand-over: a spool on another filesystem than
/// pg_wal failed every rename (EXDEV) and every fetch with it; a copy that
/// cannot be handed over made the fetch fail. The spool is a shortcut only:
/// on another filesystem its copies are copied (and re-proven), and any
/// copy that cannot be delivered is fetched from the repository instead.
#[test]
fn a_spool_that_cannot_hand_over_never_fails_a_fetch() {
    let f = fixture();
    let names = segment_names(3..9);
    let (root, repo) = f.repo("repo");
    let ours = f.archive(&repo, &names, 7, 3);
    let wal = f.dir.path().join("standby/pg_wal");
    std::fs::create_dir_all(&wal).unwrap();
    // /dev/shm is tmpfs, the test's temp dir is not.
    let shm = tempfile::tempdir_in("/dev/shm").unwrap();
    let spool = shm.path().join("spool");
    let spool_arg = ["--spool", spool.to_str().unwrap()];
    assert_ne!(
        std::os::unix::fs::MetadataExt::dev(&std::fs::metadata(shm.path()).unwrap()),
        std::os::unix::fs::MetadataExt::dev(&std::fs::metadata(&wal).unwrap()),
        "the spool must be on another filesystem for this test"
    );

    let out = f.fetch(&repo, &wal, &names[0], &spool_arg);
    assert!(out.status.success(), "{}", describe(&out));
    wait_for_spool_workers(&spool);
    spooled_copy(&spool, &names[1]);

    // Served from the spool across filesystems: the repository's object
    // is out of the way.
    let object = object_in(&root, &names[1]);
    let saved = std::fs::read(&object).unwrap();
    std::fs::remove_file(&object).unwrap();
    let out = f.fetch(&repo, &wal, &names[1], &spool_arg);
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(std::fs::read(wal.join("RECOVERYXLOG")).unwrap(), ours[1]);
    std::fs::write(&object, saved).unwrap();
    wait_for_spool_workers(&spool);

    // A copy that cannot even be read (here: a folder in its place) is
    // fetched from the repository.
    let copy = spooled_copy(&spool, &names[2]);
    std::fs::remove_file(&copy).unwrap();
    std::fs::create_dir(&copy).unwrap();
    let out = f.fetch(&repo, &wal, &names[2], &spool_arg);
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(std::fs::read(wal.join("RECOVERYXLOG")).unwrap(), ours[2]);
    wait_for_spool_workers(&spool);
    let _ = std::fs::remove_dir(&copy);
}

/// Whether the strace output `text` shows `path` (exactly) opened and that
/// descriptor fsynced before it was closed, in any process or thread.
fn opened_and_fsynced(text: &str, path: &str) -> bool {
    let lines: Vec<&str> = text.lines().collect();
    let quoted = format!("\"{path}\"");
    lines.iter().enumerate().any(|(i, line)| {
        if !line.contains("openat(") || !line.contains(&quoted) || line.contains("= -1") {
            return false;
        }
        let pid = line.split_whitespace().next().unwrap();
        // A call another thread interrupted shows its result on a later
        // "resumed" line.
        let done = if line.contains("<unfinished") {
            match lines[i..]
                .iter()
                .find(|l| l.starts_with(pid) && l.contains("openat resumed"))
            {
                Some(l) => *l,
                None => return false,
            }
        } else {
            line
        };
        let fd = done.rsplit("= ").next().unwrap().trim().to_string();
        for later in &lines[i + 1..] {
            if later.contains(&format!("fsync({fd})")) || later.contains(&format!("fsync({fd},")) {
                return true;
            }
            if later.contains(&format!("close({fd})")) {
                return false;
            }
        }
        false
    })
}

/// Finding 6: a push that found identical bytes already stored exited 0
/// without making that object durable; a push killed after its link and
/// before its fsyncs could then lose the name in a crash after PostgreSQL
/// was told 0. Now the object and its directory are fsynced first. Also
/// (Low): such a push no longer claims it "archived … stored N bytes".
#[test]
fn an_identical_push_makes_the_stored_object_durable() {
    let f = fixture();
    let (root, repo) = f.repo("repo");
    let name = "000000010000000000000003";
    let src = f.dir.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join(name), synthetic_segment(name, 7, MIB, 0)).unwrap();
    let push = |traced: Option<&Path>| {
        let mut c = match traced {
            Some(trace) => {
                let mut c = std::process::Command::new("strace");
                c.args(["-f", "-e", "trace=openat,fsync,fdatasync,close", "-o"])
                    .arg(trace)
                    .arg(&f.bin);
                c
            }
            None => std::process::Command::new(&f.bin),
        };
        c.arg("--repo")
            .arg(&repo.url)
            .args(["push", "--push-ahead", "0"])
            .arg(src.join(name))
            .arg(name)
            .output()
            .expect("strace is needed for this test: run 'make setup'")
    };
    let out = push(None);
    assert!(out.status.success(), "{}", describe(&out));
    assert!(stderr(&out).contains("archived"), "{}", describe(&out));

    let trace = f.dir.path().join("trace.txt");
    let out = push(Some(&trace));
    assert!(out.status.success(), "{}", describe(&out));
    let said = stderr(&out);
    assert!(
        said.contains("already archived with identical content"),
        "{said}"
    );
    assert!(
        !said.contains("stored"),
        "claims a store that did not happen: {said}"
    );

    let text = std::fs::read_to_string(&trace).unwrap();
    let object = object_in(&root, name);
    assert!(
        opened_and_fsynced(&text, object.to_str().unwrap()),
        "the stored object was never fsynced:\n{text}"
    );
    assert!(
        opened_and_fsynced(&text, object.parent().unwrap().to_str().unwrap()),
        "its directory was never fsynced:\n{text}"
    );
}

/// Low item: `.history` and `.backup` pushes skipped the cluster check (they
/// carry no system identifier), so another cluster's timeline history could
/// land in a repository and steer its restores. They are now checked
/// against the control file of the data directory they are archived from.
#[test]
fn history_and_backup_files_of_another_cluster_are_refused() {
    let f = fixture();
    let (root, repo) = f.repo("repo");
    f.archive(&repo, &segment_names(3..4), 7, 0);
    let data = f.dir.path().join("other-data");
    std::fs::create_dir_all(data.join("global")).unwrap();
    std::fs::create_dir_all(data.join("pg_wal")).unwrap();
    let files = [
        ("00000002.history", root.join("wal/00000002.history.zst")),
        (
            "000000010000000000000003.00000028.backup",
            root.join("wal/0000000100000000/000000010000000000000003.00000028.backup.zst"),
        ),
    ];
    for (name, _) in &files {
        std::fs::write(
            data.join("pg_wal").join(name),
            b"1\t0/3000000\tno recovery target\n",
        )
        .unwrap();
    }
    let control = |sysid: u64| {
        let mut bytes = vec![0u8; 8192];
        bytes[..8].copy_from_slice(&sysid.to_le_bytes());
        std::fs::write(data.join("global/pg_control"), bytes).unwrap();
    };
    // As archive_command runs: from the data directory, %p relative to it.
    let push = |name: &str| {
        repo.walvault(&f.bin)
            .current_dir(&data)
            .args(["push", "--push-ahead", "0"])
            .arg(format!("pg_wal/{name}"))
            .arg(name)
            .output()
            .unwrap()
    };
    control(8);
    for (name, object) in &files {
        let out = push(name);
        assert_eq!(out.status.code(), Some(3), "{name}: {}", describe(&out));
        assert!(stderr(&out).contains("cluster"), "{}", describe(&out));
        assert!(!object.exists(), "{name} of another cluster was stored");
    }
    control(7);
    for (name, object) in &files {
        let out = push(name);
        assert!(out.status.success(), "{name}: {}", describe(&out));
        assert!(object.exists(), "{name} was not stored");
    }
}

/// Low item: a stored object with a compression code this walvault does not
/// know (a newer walvault's) counted as damaged, and a push replaced it.
/// It is kept, and the push refuses with a word about upgrading.
#[test]
fn an_object_of_a_newer_compression_is_never_replaced() {
    let f = fixture();
    let (root, repo) = f.repo("repo");
    let name = "000000010000000000000003";
    f.archive(&repo, &[name.to_string()], 7, 0);
    let object = object_in(&root, name);
    let mut stored = std::fs::read(&object).unwrap();
    stored[14] = 2; // the header's compression code; 1 is zstd
    std::fs::write(&object, &stored).unwrap();

    let src = f.dir.path().join("src-7-0").join(name);
    let out = repo
        .walvault(&f.bin)
        .args(["push", "--push-ahead", "0"])
        .arg(&src)
        .arg(name)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", describe(&out));
    assert!(stderr(&out).contains("upgrade"), "{}", describe(&out));
    assert_eq!(
        std::fs::read(&object).unwrap(),
        stored,
        "the object was replaced"
    );
}

/// A segment of cluster 7 whose content past its header does not compress.
fn incompressible_segment(name: &str, size: u32, seed: u64) -> Vec<u8> {
    let mut data = synthetic_segment(name, 7, size, 0);
    let mut x = seed | 1;
    for chunk in data[8192..].chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let bytes = x.to_le_bytes();
        chunk.copy_from_slice(&bytes[..chunk.len()]);
    }
    data
}

/// Low item: the prefetch worker read every object of its window into
/// memory at once (24 segments of 4 MiB that do not compress: 96 MiB).
/// It now streams each into its spool file, a few at a time.
#[test]
fn prefetch_memory_does_not_grow_with_the_window() {
    const SIZE: u32 = 4 << 20;
    let f = fixture();
    let (_, repo) = f.repo("repo");
    let names = segment_names(3..28);
    let src = f.dir.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    let mut originals = vec![];
    for (i, n) in names.iter().enumerate() {
        let data = incompressible_segment(n, SIZE, i as u64 + 1);
        std::fs::write(src.join(n), &data).unwrap();
        let out = repo
            .walvault(&f.bin)
            .args(["push", "--push-ahead", "0", "--compress-level", "1"])
            .arg(src.join(n))
            .arg(n)
            .output()
            .unwrap();
        assert!(out.status.success(), "{n}: {}", describe(&out));
        originals.push(data);
        std::fs::remove_file(src.join(n)).unwrap();
    }
    let spool = f.dir.path().join("spool");
    let out = std::process::Command::new("/usr/bin/time")
        .args(["-f", "peak-rss-kb %M"])
        .arg(&f.bin)
        .arg("--repo")
        .arg(&repo.url)
        .arg("fetch-ahead")
        .arg("--spool")
        .arg(&spool)
        .args(["--count", "24", "--segment-size", &SIZE.to_string()])
        .arg(&names[0])
        .output()
        .expect("/usr/bin/time is needed for this test");
    assert!(out.status.success(), "{}", describe(&out));
    let said = stderr(&out);
    assert!(said.contains("prefetched 24 of 24"), "{said}");
    let peak_kb: u64 = said
        .lines()
        .find_map(|l| l.strip_prefix("peak-rss-kb "))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // Less than the window itself: what the worker holds is a few
    // downloads' frames (and what the allocator keeps of them), however
    // long the window; before, it held every object of it (156 MB here).
    assert!(
        peak_kb < 96 << 10,
        "the prefetch worker peaked at {peak_kb} kB for a 96 MiB window"
    );

    // What it spooled is what was archived.
    let wal = f.dir.path().join("standby/pg_wal");
    std::fs::create_dir_all(&wal).unwrap();
    let spool_arg = ["--spool", spool.to_str().unwrap(), "--prefetch", "0"];
    let out = f.fetch(&repo, &wal, &names[5], &spool_arg[..2]);
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(
        std::fs::read(wal.join("RECOVERYXLOG")).unwrap(),
        originals[5]
    );
    wait_for_spool_workers(&spool);
}

/// The same on S3 (where the worker streams each object's body): copies
/// prefetched from one prefix serve that prefix, even with its object gone,
/// and never another prefix of the same store sharing the spool.
#[test]
fn s3_prefetched_copies_serve_only_their_own_repository() {
    let s3 = S3Server::start();
    let f = fixture();
    let names = segment_names(3..9);
    let (repo_a, repo_b) = (s3.target("a"), s3.target("b"));
    let ours_a = f.archive(&repo_a, &names, 7, 4);
    let ours_b = f.archive(&repo_b, &names, 8, 5);
    let wal = f.dir.path().join("standby/pg_wal");
    std::fs::create_dir_all(&wal).unwrap();
    let spool = wal.join("walvault-spool");

    let out = f.fetch(&repo_a, &wal, &names[0], &[]);
    assert!(out.status.success(), "{}", describe(&out));
    wait_for_spool_workers(&spool);
    spooled_copy(&spool, &names[1]);
    let key = |n: &str| format!("wal/0000000100000000/{n}.zst");
    std::fs::remove_file(s3.object_path("a", &key(&names[1]))).unwrap();
    let out = f.fetch(&repo_a, &wal, &names[1], &[]);
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(std::fs::read(wal.join("RECOVERYXLOG")).unwrap(), ours_a[1]);
    wait_for_spool_workers(&spool);

    let out = f.fetch(&repo_b, &wal, &names[2], &[]);
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(std::fs::read(wal.join("RECOVERYXLOG")).unwrap(), ours_b[2]);
    wait_for_spool_workers(&spool);
}
