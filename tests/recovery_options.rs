//! The recovery options operators use, against a real PostgreSQL 15: once a
//! PITR copy has archived timeline 2 into the repository, `--target-timeline
//! 1` still recovers timeline 1 to its end while the default follows
//! timeline 2; `--target-exclusive`, `--recovery-option` and `--archive-mode
//! off` do what they say; bad values are refused before anything is written.

mod common;

use common::*;

fn wal_objects(repo: &std::path::Path) -> Vec<String> {
    walkdir::WalkDir::new(repo.join("wal"))
        .into_iter()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_file())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

#[test]
fn timelines_exclusive_targets_options_and_archive_mode() {
    let s = setup(&|root| RepoTarget::local(&root.join("repo")));
    let p = &s.primary;
    p.sql("CREATE TABLE t (batch int, id int)");
    p.sql("INSERT INTO t SELECT 1, g FROM generate_series(1, 1000) g");
    s.backup();
    p.sql("INSERT INTO t SELECT 2, g FROM generate_series(1, 1000) g");
    let after_2 = p.sql("SELECT pg_current_wal_lsn()");
    p.switch_wal();
    let xid_3 = p.sql(
        "WITH ins AS (INSERT INTO t SELECT 3, g FROM generate_series(1, 1000) g RETURNING 1) \
         SELECT txid_current() FROM ins LIMIT 1",
    );
    let last = p.switch_wal();
    p.wait_archived(&last);

    // A PITR copy that keeps archiving: it promotes onto timeline 2 and
    // archives it into the same repository.
    let copy = s.restore_as_is("copy", &["--lsn", &after_2]);
    copy.wait_promoted();
    copy.sql("INSERT INTO t SELECT 9, g FROM generate_series(1, 500) g");
    let last = copy.switch_wal();
    copy.wait_archived(&last);
    drop(copy);
    let repo_dir = s.root().join("repo");
    assert!(wal_objects(&repo_dir).contains(&"00000002.history.zst".to_string()));

    // The default follows the newest timeline...
    let latest = s.restore_and_start("latest", &[]);
    latest.wait_promoted();
    assert_eq!(Setup::batches(&latest), "1:1000 2:1000 9:500");
    drop(latest);

    // ...--target-timeline 1 replays timeline 1 to its end, and
    // --archive-mode off keeps that copy out of the repository.
    let before = wal_objects(&repo_dir).len();
    let tl1 = s.restore_as_is("tl1", &["--target-timeline", "1", "--archive-mode", "off"]);
    tl1.wait_promoted();
    assert_eq!(Setup::batches(&tl1), "1:1000 2:1000 3:1000");
    assert_eq!(tl1.sql("SHOW archive_mode"), "off");
    tl1.switch_wal();
    std::thread::sleep(std::time::Duration::from_secs(2));
    drop(tl1);
    assert_eq!(wal_objects(&repo_dir).len(), before, "the copy archived");
    assert!(!wal_objects(&repo_dir).contains(&"00000003.history.zst".to_string()));

    // --target-exclusive stops just before the xid; --recovery-option sets
    // any other setting.
    let exclusive = s.restore_and_start(
        "exclusive",
        &[
            "--target-timeline",
            "1",
            "--xid",
            &xid_3,
            "--target-exclusive",
            "--recovery-option",
            "work_mem=7MB",
        ],
    );
    exclusive.wait_promoted();
    assert_eq!(Setup::batches(&exclusive), "1:1000 2:1000");
    assert_eq!(exclusive.sql("SHOW work_mem"), "7MB");
    let conf =
        std::fs::read_to_string(s.root().join("exclusive/data/postgresql.auto.conf")).unwrap();
    assert!(
        conf.contains("recovery_target_inclusive = 'false'")
            && conf.contains("recovery_target_timeline = '1'"),
        "{conf}"
    );
    drop(exclusive);

    // Refusals, before anything is written.
    for (args, code) in [
        (vec!["--target-timeline", "x"], 2),
        (vec!["--target-timeline", "0"], 2),
        (vec!["--recovery-option", "bad key=1"], 2),
        (vec!["--recovery-option", "no_equals"], 2),
        (vec!["--target-exclusive"], 2),
        (vec!["--archive-mode", "sometimes"], 2),
        (vec!["--target-timeline", "7"], 1),
    ] {
        let out = s.restore("refused", &args);
        assert_eq!(
            out.status.code(),
            Some(code),
            "{args:?}: {}",
            describe(&out)
        );
        assert_eq!(
            String::from_utf8_lossy(&out.stderr).trim().lines().count(),
            1,
            "{}",
            describe(&out)
        );
        assert!(!s.root().join("refused/data").exists(), "{args:?}");
    }
}
