//! The repository as a place to keep secrets and promises: what walvault
//! creates in it is readable by its owner (and a configured group) only,
//! create-only writes are proven before they are relied on, and a damaged
//! `walvault.json` is a clear error, never a crash.

mod common;

use common::*;
use std::path::Path;

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
