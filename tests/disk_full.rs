//! A full disk, on small tmpfs mounts (root only; skipped otherwise): a push
//! into a full repository fails cleanly with a retryable status and leaves
//! nothing half-written that a fetch would see; after space is freed the same
//! push succeeds and the bytes come back. A prefetch spool that fills never
//! fails a fetch. A restore target that fills fails retryably in one line and
//! leaves nothing startable (no backup_label, no signal file); on a bigger
//! disk the restore succeeds. A fetch into a full pg_wal stops archive
//! recovery (200 + 5), leaves nothing at %p, and succeeds once space is freed.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;

const SEG: u32 = 1 << 20;
const SYSID: u64 = 7_000_000_000_000_000_123;

/// A tmpfs of `size` at a new directory; unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: PathBuf, size: &str) -> Tmpfs {
        std::fs::create_dir_all(&at).unwrap();
        run_capture(
            Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0777")])
                .arg("tmpfs")
                .arg(&at),
        );
        Tmpfs(at)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// A segment whose content zstd cannot shrink: the disk fills predictably.
fn incompressible_segment(dir: &Path, name: &str, seed: u64) -> PathBuf {
    let mut bytes = synthetic_segment(name, SYSID, SEG, 0);
    let mut x = seed | 1;
    for b in bytes[64..].iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

fn name(i: u32) -> String {
    format!("00000001000000000000{i:04X}")
}

#[test]
fn a_full_repository_fails_cleanly_and_resumes() {
    if !is_root() {
        eprintln!("skipped: mounting a tmpfs needs root");
        return;
    }
    let dir = scratch();
    let bin = install_binary(dir.path());
    let disk = Tmpfs::mount(dir.path().join("small"), "6m");
    let repo = RepoTarget::local(&disk.0.join("repo"));
    let push = |path: &Path, name: &str| {
        repo.walvault(&bin)
            .args(["push", "--push-ahead", "0"])
            .arg(path)
            .arg(name)
            .output()
            .unwrap()
    };
    let fetch = |name: &str, to: &Path| {
        repo.walvault(&bin)
            .args(["fetch", "--prefetch", "0", name])
            .arg(to)
            .output()
            .unwrap()
    };
    // Push until the disk refuses one.
    let mut pushed = vec![];
    let mut refused = None;
    for i in 1..=12u32 {
        let n = name(i);
        let path = incompressible_segment(dir.path(), &n, u64::from(i));
        let out = push(&path, &n);
        if out.status.success() {
            pushed.push((n, path));
            continue;
        }
        // Retryable for PostgreSQL's archiver, and said in one line.
        assert_eq!(out.status.code(), Some(5), "{}", describe(&out));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
        assert!(
            stderr.contains("No space left") || stderr.contains("space"),
            "{stderr}"
        );
        refused = Some((n, path));
        break;
    }
    let (refused_name, refused_path) = refused.expect("the 6 MiB disk never filled");
    assert!(!pushed.is_empty());

    // Nothing half-written is visible: the refused segment is not in the
    // archive, and every one pushed before comes back byte for byte.
    let out_dir = dir.path().join("out");
    std::fs::create_dir(&out_dir).unwrap();
    let out = fetch(&refused_name, &out_dir.join("x"));
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(!out_dir.join("x").exists());
    for (n, path) in &pushed {
        let to = out_dir.join(n);
        let out = fetch(n, &to);
        assert!(out.status.success(), "{}", describe(&out));
        assert_eq!(std::fs::read(&to).unwrap(), std::fs::read(path).unwrap());
    }

    // Space freed (the oldest segment moved off, as an operator would):
    // PostgreSQL's retry of the same push now succeeds.
    let victim = walkdir::WalkDir::new(disk.0.join("repo/wal"))
        .into_iter()
        .filter_map(|e| e.ok())
        .find(|e| {
            e.file_type().is_file() && e.file_name().to_string_lossy().starts_with(&pushed[0].0)
        })
        .unwrap();
    std::fs::remove_file(victim.path()).unwrap();
    let out = push(&refused_path, &refused_name);
    assert!(
        out.status.success(),
        "after freeing space: {}",
        describe(&out)
    );
    let to = out_dir.join(&refused_name);
    let out = fetch(&refused_name, &to);
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(
        std::fs::read(&to).unwrap(),
        std::fs::read(&refused_path).unwrap()
    );
}

#[test]
fn a_full_prefetch_spool_never_fails_a_fetch() {
    if !is_root() {
        eprintln!("skipped: mounting a tmpfs needs root");
        return;
    }
    let dir = scratch();
    let bin = install_binary(dir.path());
    let repo = RepoTarget::local(&dir.path().join("repo"));
    let mut segments = vec![];
    for i in 1..=8u32 {
        let n = name(i);
        let path = incompressible_segment(dir.path(), &n, u64::from(i));
        let out = repo
            .walvault(&bin)
            .args(["push", "--push-ahead", "0"])
            .arg(&path)
            .arg(&n)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", describe(&out));
        segments.push((n, path));
    }
    // Room for about one and a half prefetched segments.
    let spool = Tmpfs::mount(dir.path().join("spool"), "1536k");
    // Called as PostgreSQL calls it on a standby: from the data directory,
    // where the signal file says recovery is under way (fetch prefetches
    // only then).
    let data = dir.path().join("data");
    std::fs::create_dir_all(data.join("pg_wal")).unwrap();
    std::fs::write(data.join("standby.signal"), b"").unwrap();
    for (n, path) in &segments {
        let to = data.join("pg_wal/RECOVERYXLOG");
        let out = repo
            .walvault(&bin)
            .current_dir(&data)
            .args(["fetch", "--prefetch", "6", "--spool"])
            .arg(&spool.0)
            .arg(n)
            .arg("pg_wal/RECOVERYXLOG")
            .output()
            .unwrap();
        assert!(out.status.success(), "{n}: {}", describe(&out));
        assert_eq!(
            std::fs::read(&to).unwrap(),
            std::fs::read(path).unwrap(),
            "{n}"
        );
    }
    wait_for_spool_workers(&spool.0);
    // The worker did run, beside the full disk.
    assert!(
        spool.0.join("prefetch-worker.log").exists(),
        "no prefetch worker ran"
    );
}

/// The entries of `dir`, by name, sorted.
fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn a_full_restore_target_fails_cleanly_and_resumes() {
    if !is_root() {
        eprintln!("skipped: mounting a tmpfs needs root");
        return;
    }
    let s = setup(&|root| RepoTarget::local(&root.join("repo")));
    // A few MB of rows in the backup, and more after it that only the
    // archive holds.
    s.primary.sql(
        "CREATE TABLE t (batch int, pad text); \
         INSERT INTO t SELECT 1, repeat(md5(g::text), 20) FROM generate_series(1, 5000) g",
    );
    s.backup();
    s.primary
        .sql("INSERT INTO t SELECT 2, md5(g::text) FROM generate_series(1, 700) g");
    let last = s.primary.switch_wal();
    s.primary.wait_archived(&last);
    let expected = Setup::batches(&s.primary);

    // The data directory alone is tens of MB: 8 MB fills.
    let at = s.root().join("target");
    let small = Tmpfs::mount(at.clone(), "8m");
    let data = at.join("data");
    let out = s.restore("target", &[]);
    // Retryable, and said in one line that names the path and the cause.
    assert_eq!(out.status.code(), Some(5), "{}", describe(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("No space left on device"), "{stderr}");
    assert!(stderr.contains(&data.display().to_string()), "{stderr}");
    assert!(stderr.contains("incomplete, do not start it"), "{stderr}");
    // Nothing in the partial copy says "ready": backup_label and the signal
    // files are written last, and PostgreSQL refuses to start on it (why
    // depends on which files made it: no postgresql.conf, no pg_control, or
    // no WAL for crash recovery from pg_control's checkpoint).
    assert!(data.is_dir());
    for name in [
        "backup_label",
        "recovery.signal",
        "standby.signal",
        "tablespace_map",
    ] {
        assert!(!data.join(name).exists(), "{name} in a failed restore");
    }
    let refused = {
        let log = s.root().join("partial.log");
        let started = as_postgres(pg_bindir().join("pg_ctl"))
            .args(["-w", "-t", "30", "-D"])
            .arg(&data)
            .arg("-l")
            .arg(&log)
            .arg("-o")
            .arg(format!(
                "-c unix_socket_directories={} -c listen_addresses=''",
                s.root().display()
            ))
            .arg("start")
            .output()
            .unwrap();
        if started.status.success() {
            let _ = as_postgres(pg_bindir().join("pg_ctl"))
                .args(["-w", "-m", "immediate", "-D"])
                .arg(&data)
                .arg("stop")
                .output();
        }
        !started.status.success()
    };
    assert!(refused, "PostgreSQL started on a failed restore");

    // The leftover is refused, clearly, rather than written over.
    let out = s.restore("target", &[]);
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains(&format!(
            "--pgdata {} is not empty; restore into an empty or new directory",
            data.display()
        )),
        "{stderr}"
    );

    // Space freed: a bigger disk at the same place, and the same restore
    // now succeeds with exactly the primary's rows.
    drop(small);
    assert!(!data.exists(), "the small tmpfs is still mounted");
    let _big = Tmpfs::mount(at.clone(), "256m");
    let restored = s.restore_and_start("target", &[]);
    restored.wait_promoted();
    assert_eq!(Setup::batches(&restored), expected);
}

#[test]
fn a_fetch_into_a_full_pg_wal_fails_cleanly_and_resumes() {
    if !is_root() {
        eprintln!("skipped: mounting a tmpfs needs root");
        return;
    }
    let dir = scratch();
    let bin = install_binary(dir.path());
    let repo = RepoTarget::local(&dir.path().join("repo"));
    let n = name(1);
    let segment = incompressible_segment(dir.path(), &n, 1);
    let out = repo
        .walvault(&bin)
        .args(["push", "--push-ahead", "0"])
        .arg(&segment)
        .arg(&n)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", describe(&out));

    // pg_wal on its own small disk, filled but for half a segment.
    let data = dir.path().join("data");
    let pg_wal = Tmpfs::mount(data.join("pg_wal"), "2m");
    let fill = |on: bool| {
        let filler = pg_wal.0.join("filler");
        if on {
            std::fs::write(&filler, vec![1u8; 1536 << 10]).unwrap();
        } else {
            std::fs::remove_file(&filler).unwrap();
        }
    };
    // Called as PostgreSQL calls restore_command: from the data directory.
    let fetch = || {
        repo.walvault(&bin)
            .current_dir(&data)
            .args(["fetch", "--prefetch", "0"])
            .arg(&n)
            .arg("pg_wal/RECOVERYXLOG")
            .output()
            .unwrap()
    };
    let restored = pg_wal.0.join("RECOVERYXLOG");

    // Archive recovery: above 125 (200 + I/O), so that PostgreSQL stops
    // instead of ending recovery there. Then a standby (standby.signal wins
    // over recovery.signal): the ordinary status, it retries or streams.
    // Either way no partial file at %p and no temporary left beside it.
    for (signal, status) in [("recovery.signal", 205), ("standby.signal", 5)] {
        std::fs::write(data.join(signal), b"").unwrap();
        fill(true);
        let out = fetch();
        assert_eq!(
            out.status.code(),
            Some(status),
            "{signal}: {}",
            describe(&out)
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
        assert!(stderr.contains("No space left on device"), "{stderr}");
        assert!(stderr.contains("RECOVERYXLOG"), "{stderr}");
        if status > 125 {
            // What to do names the local disk, not only the repository.
            assert!(stderr.contains("full or unwritable local disk"), "{stderr}");
        }
        assert_eq!(entries(&pg_wal.0), ["filler"], "{signal}");

        // Space freed: the same call delivers the whole segment.
        fill(false);
        let out = fetch();
        assert!(out.status.success(), "{signal}: {}", describe(&out));
        assert_eq!(
            std::fs::read(&restored).unwrap(),
            std::fs::read(&segment).unwrap()
        );
        assert_eq!(entries(&pg_wal.0), ["RECOVERYXLOG"], "{signal}");
        std::fs::remove_file(&restored).unwrap();
    }
}
