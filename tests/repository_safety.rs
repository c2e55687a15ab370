//! The repository as a place to keep secrets and promises: what walvault
//! creates in it is readable by its owner (and a configured group) only,
//! create-only writes are proven before they are relied on, and a damaged
//! `walvault.json` is a clear error, never a crash.

mod common;

use common::*;
use std::path::Path;
use std::process::Command;

const SYSID: u64 = 7_300_000_000_000_000_042;
const SEG_SIZE: u32 = 1 << 20;

/// Writes a synthetic segment named `name` into `dir` and returns its path.
fn segment_file(dir: &Path, name: &str, fill: u8) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, synthetic_segment(name, SYSID, SEG_SIZE, fill)).unwrap();
    path
}

/// walvault pushing `path` as `name`, nothing ahead.
fn push(repo: &RepoTarget, bin: &Path, path: &Path, name: &str) -> std::process::Output {
    repo.walvault(bin)
        .args(["push", "--push-ahead", "0"])
        .arg(path)
        .arg(name)
        .output()
        .unwrap()
}

#[test]
fn damaged_config_is_a_clear_error_never_a_panic() {
    let dir = scratch();
    let bin = install_binary(dir.path());
    let root = dir.path().join("repo");
    let repo = RepoTarget::local(&root);
    let name = "000000010000000000000003";
    let seg = segment_file(dir.path(), name, 1);
    let out = push(&repo, &bin, &seg, name);
    assert!(out.status.success(), "{}", describe(&out));

    let config_path = root.join("walvault.json");
    let good: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&config_path).unwrap()).unwrap();
    let spoil = |field: &str, value: serde_json::Value| {
        let mut c = good.clone();
        c[field] = value;
        std::fs::write(&config_path, serde_json::to_vec_pretty(&c).unwrap()).unwrap();
    };
    let cases = [
        ("wal_segment_size", serde_json::json!(0)),
        ("wal_segment_size", serde_json::json!(12345)),
        ("system_identifier", serde_json::json!("not-a-number")),
        ("format", serde_json::json!(0)),
        ("pg_version", serde_json::json!(0)),
    ];
    for (field, value) in cases {
        spoil(field, value.clone());
        for args in [
            &["status"][..],
            &["verify"],
            &["list"],
            &["prune", "--keep-last", "1"],
            &["drill"],
        ] {
            let out = repo.walvault(&bin).args(args).output().unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(
                out.status.code(),
                Some(4),
                "{args:?} with {field}={value}: {}",
                describe(&out)
            );
            assert!(
                stderr.contains("walvault.json") && stderr.contains(field),
                "{args:?} with {field}={value}: {}",
                describe(&out)
            );
            assert_eq!(stderr.trim_end().lines().count(), 1, "{}", describe(&out));
        }
        // A push compares clusters with the config: refused, nothing written.
        let next = "000000010000000000000004";
        let seg = segment_file(dir.path(), next, 2);
        let out = push(&repo, &bin, &seg, next);
        assert_eq!(out.status.code(), Some(4), "push: {}", describe(&out));
        assert!(
            !root
                .join("wal/0000000100000000")
                .join(format!("{next}.zst"))
                .exists()
        );
        // fetch of a stored segment still delivers it; of a missing one never panics.
        let dest = dir.path().join("fetched");
        let out = repo
            .walvault(&bin)
            .args(["fetch", "--prefetch", "0", name])
            .arg(&dest)
            .output()
            .unwrap();
        assert!(
            out.status.code().is_some_and(|c| c != 101),
            "{}",
            describe(&out)
        );
        let _ = std::fs::remove_file(&dest);
    }
}

#[test]
fn s3_create_only_is_probed_once_per_repository() {
    let s3 = S3Server::start();
    let dir = scratch();
    let bin = install_binary(dir.path());
    let repo = s3.target("probed");
    let record = s3.object_path("probed", "locks/create-only.json");
    let locks = record.parent().unwrap().to_path_buf();

    let first = "000000010000000000000001";
    let out = push(&repo, &bin, &segment_file(dir.path(), first, 1), first);
    assert!(out.status.success(), "{}", describe(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("If-None-Match: *"), "{}", describe(&out));
    let recorded = std::fs::read(&record).expect("the probe is recorded");
    let json: serde_json::Value = serde_json::from_slice(&recorded).unwrap();
    assert_eq!(
        json["store"],
        format!("http://127.0.0.1:{}", s3.port),
        "{json}"
    );
    // The probe objects are gone: only the record is left under locks/.
    let left: Vec<_> = std::fs::read_dir(&locks)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("probe"))
        .collect();
    assert!(left.is_empty(), "{left:?}");

    // Later writers trust the record: no probe, no new record.
    let second = "000000010000000000000002";
    let out = push(&repo, &bin, &segment_file(dir.path(), second, 2), second);
    assert!(out.status.success(), "{}", describe(&out));
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("If-None-Match"),
        "{}",
        describe(&out)
    );
    assert_eq!(std::fs::read(&record).unwrap(), recorded);
    // And create-only still holds: other bytes under an archived name are refused.
    let out = push(&repo, &bin, &segment_file(dir.path(), second, 3), second);
    assert_eq!(out.status.code(), Some(3), "{}", describe(&out));
}

/// Every file and directory under `root` (not `root` itself) whose mode is
/// not `file_mode` / `dir_mode`, with its mode.
fn wrong_modes(root: &Path, file_mode: u32, dir_mode: u32) -> Vec<String> {
    use std::os::unix::fs::PermissionsExt;
    let mut wrong = vec![];
    let mut seen = 0;
    for entry in walkdir::WalkDir::new(root).min_depth(1) {
        let entry = entry.unwrap();
        let mode = entry.metadata().unwrap().permissions().mode() & 0o7777;
        let want = if entry.file_type().is_dir() {
            dir_mode
        } else {
            file_mode
        };
        seen += 1;
        if mode != want {
            wrong.push(format!("{} {mode:o}", entry.path().display()));
        }
    }
    assert!(seen > 3, "nothing to check under {}", root.display());
    wrong
}

/// `walvault --repo URL` under umask 022, as a cron job or a login shell
/// runs it; as the PostgreSQL OS user when `as_pg`.
fn walvault_umask_022(repo: &RepoTarget, bin: &Path, as_pg: bool) -> Command {
    let mut c = if as_pg {
        as_postgres("sh")
    } else {
        Command::new("sh")
    };
    c.args(["-c", "umask 022 && exec \"$@\"", "sh", "env"]);
    for (k, v) in &repo.env {
        c.arg(format!("{k}={v}"));
    }
    c.arg(bin).arg("--repo").arg(&repo.url);
    c
}

#[test]
fn pushed_files_are_private_whatever_the_umask() {
    use std::os::unix::fs::PermissionsExt;
    let dir = scratch();
    let bin = install_binary(dir.path());
    let parent = dir.path().join("srv");
    std::fs::create_dir(&parent).unwrap();
    std::fs::set_permissions(&parent, std::fs::Permissions::from_mode(0o755)).unwrap();
    // (repository root, its mode before the first push, file and directory modes expected)
    let cases = [
        ("new", None, 0o600, 0o700),
        ("owner-only", Some(0o700), 0o600, 0o700),
        ("group", Some(0o750), 0o640, 0o750),
        // A plain mkdir under umask 022 grants its group nothing on purpose.
        ("operator-mkdir", Some(0o755), 0o600, 0o700),
    ];
    for (name, root_mode, file_mode, dir_mode) in cases {
        let root = parent.join(name);
        if let Some(m) = root_mode {
            std::fs::create_dir(&root).unwrap();
            std::fs::set_permissions(&root, std::fs::Permissions::from_mode(m)).unwrap();
        }
        let repo = RepoTarget::local(&root);
        for (seg, fill) in [
            ("000000010000000000000001", 1),
            ("000000010000000000000002", 2),
        ] {
            let path = segment_file(dir.path(), seg, fill);
            let out = walvault_umask_022(&repo, &bin, false)
                .args(["push", "--push-ahead", "0"])
                .arg(&path)
                .arg(seg)
                .output()
                .unwrap();
            assert!(out.status.success(), "{name}: {}", describe(&out));
        }
        let root_now = std::fs::metadata(&root).unwrap().permissions().mode() & 0o7777;
        assert_eq!(root_now, root_mode.unwrap_or(0o700), "{name}: root");
        let wrong = wrong_modes(&root, file_mode, dir_mode);
        assert!(wrong.is_empty(), "{name}: {wrong:#?}");
    }
}

#[test]
fn backup_files_are_private_whatever_the_umask() {
    use std::os::unix::fs::PermissionsExt;
    // The operator's `mkdir` of the repository: 0755, owned by postgres.
    let s = setup(&|root: &Path| {
        let repo = root.join("repo");
        std::fs::create_dir(&repo).unwrap();
        std::fs::set_permissions(&repo, std::fs::Permissions::from_mode(0o755)).unwrap();
        give_to_postgres(&repo);
        RepoTarget::local(&repo)
    });
    s.primary
        .sql("CREATE TABLE t (batch int, n int); INSERT INTO t SELECT 1, g FROM generate_series(1, 1000) g");
    let out = walvault_umask_022(&s.repo, &s.bin, true)
        .envs(s.primary.libpq_env())
        .args(["backup", "--archive-timeout", "60", "--pgdata"])
        .arg(&s.primary.data)
        .output()
        .unwrap();
    assert!(out.status.success(), "backup: {}", describe(&out));
    let prune = walvault_umask_022(&s.repo, &s.bin, true)
        .args(["prune", "--keep-last", "1"])
        .output()
        .unwrap();
    assert!(prune.status.success(), "prune: {}", describe(&prune));

    // Nothing in it for other users, nor for the root's group: a 0755
    // directory grants its group nothing on purpose.
    let root = Path::new(&s.repo.url);
    let wrong = wrong_modes(root, 0o600, 0o700);
    assert!(wrong.is_empty(), "{wrong:#?}");
    assert!(root.join("packs").is_dir() && root.join("backups").is_dir());

    // A restore beside it still makes a data directory PostgreSQL starts.
    let restored = s.restore_and_start("restored", &[]);
    assert_eq!(restored.sql("SELECT count(*) FROM t"), "1000");
}
