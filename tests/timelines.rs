//! A second timeline in one repository, with a real PostgreSQL 15: a
//! point-in-time copy that archives its new timeline next to the original's,
//! and what prune, verify, status and restore make of it.

mod common;

use common::*;
use std::path::Path;
use std::time::Duration;

fn walvault(s: &Setup, args: &[&str]) -> std::process::Output {
    s.repo
        .walvault_as_postgres(&s.bin)
        .args(args)
        .output()
        .unwrap()
}

fn ok(s: &Setup, args: &[&str]) -> String {
    let out = walvault(s, args);
    assert!(
        out.status.success(),
        "walvault {args:?}: {}",
        describe(&out)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Segment names of `timeline` stored in a filesystem repository, sorted.
fn segments_of(repo_dir: &Path, timeline: &str) -> Vec<String> {
    let mut names: Vec<String> = walkdir::WalkDir::new(repo_dir.join("wal"))
        .into_iter()
        .map(|e| e.unwrap())
        .filter_map(|e| {
            e.file_name()
                .to_str()?
                .strip_suffix(".zst")
                .map(str::to_string)
        })
        .filter(|n| n.len() == 24 && n.starts_with(timeline))
        .collect();
    names.sort();
    names
}

/// The timeline-`timeline` segment (1 MiB segments) holding a backup's start.
fn start_segment(s: &Setup, id: &str, timeline: u32) -> String {
    let list = s.list_json();
    let b = list
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["id"] == id)
        .unwrap();
    let (hi, lo) = b["start_lsn"].as_str().unwrap().split_once('/').unwrap();
    let lsn = u64::from_str_radix(hi, 16).unwrap() << 32 | u64::from_str_radix(lo, 16).unwrap();
    let segno = lsn >> 20;
    format!("{timeline:08X}{:08X}{:08X}", segno >> 12, segno & 0xFFF)
}

/// Three timeline-1 backups; a point-in-time copy of the first promotes to
/// timeline 2, archives into the same repository, is backed up and writes
/// many rows. Timeline 2's LSNs stay below the newest timeline-1 backup's.
#[test]
fn prune_keeps_the_wal_of_a_second_timeline() {
    let mut s = setup(&|root| RepoTarget::local(&root.join("repo")));
    let p = &s.primary;
    p.sql("CREATE TABLE t (batch int, id int)");
    p.sql("INSERT INTO t SELECT 1, g FROM generate_series(1, 1000) g");
    let mut ids = vec![s.backup()];
    let branch_at = p.sql("SELECT pg_current_wal_lsn()");
    for batch in 2..=3 {
        p.sql(&format!(
            "INSERT INTO t SELECT {batch}, g FROM generate_series(1, 30000) g"
        ));
        std::thread::sleep(Duration::from_millis(1100)); // ids have one-second resolution
        ids.push(s.backup());
    }
    let last = p.switch_wal();
    p.wait_archived(&last);
    s.primary.stop();

    // The copy: restored to a point before the second backup, archiving
    // into the same repository.
    let out = s.restore("copy", &["--lsn", &branch_at]);
    assert!(out.status.success(), "{}", describe(&out));
    let dir = s.root().join("copy");
    let mut copy = PgServer::existing(&dir, &dir.join("data"), vec![]);
    copy.append_conf(&format!(
        "archive_mode = on\narchive_command = '{}'",
        s.repo.push_command(&s.bin)
    ));
    copy.start();
    copy.wait_promoted();
    assert_eq!(
        copy.sql("SELECT timeline_id FROM pg_control_checkpoint()"),
        "2"
    );
    std::thread::sleep(Duration::from_millis(1100));
    let on_tl2 = s.backup_of(&copy);
    copy.sql("INSERT INTO t SELECT 5, g FROM generate_series(1, 120000) g");
    let last = copy.switch_wal();
    copy.wait_archived(&last);
    copy.stop();
    let repo = s.root().join("repo");
    let from = start_segment(&s, &on_tl2, 2);
    let tl2_needed: Vec<String> = segments_of(&repo, "00000002")
        .into_iter()
        .filter(|n| *n >= from)
        .collect();

    let out = ok(&s, &["prune", "--keep-last", "2"]);
    assert!(out.starts_with("prune: deleted 2 backups"), "{out}");
    let listed: Vec<String> = s
        .list_json()
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(listed, [ids[2].clone(), on_tl2.clone()]);
    let tl2_after: Vec<String> = segments_of(&repo, "00000002")
        .into_iter()
        .filter(|n| *n >= from)
        .collect();
    assert_eq!(
        tl2_after, tl2_needed,
        "prune deleted timeline-2 WAL the timeline-2 backup needs"
    );
    let out = ok(&s, &["verify"]);
    assert!(out.contains("no problems"), "{out}");

    // The timeline-2 backup replays to the end: every row is there.
    let restored = s.restore_and_start("tl2", &["--backup", &on_tl2]);
    restored.wait_promoted();
    assert_eq!(Setup::batches(&restored), "1:1000 5:120000");
    drop(restored);

    // A needed timeline-2 segment lost by hand is a gap verify names.
    let lost = &tl2_needed[tl2_needed.len() - 3];
    std::fs::remove_file(
        repo.join("wal")
            .join(&lost[..16])
            .join(format!("{lost}.zst")),
    )
    .unwrap();
    let out = walvault(&s, &["verify"]);
    assert_eq!(out.status.code(), Some(4), "{}", describe(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("missing WAL segment {lost}")),
        "{text}"
    );

    // Timeline 2 shows where it came from, and steers restores to latest
    // of the timeline-1 backup taken after it branched off.
    let status = ok(&s, &["status"]);
    assert!(
        status.contains(&format!(
            "timeline 2 branched from timeline 1 at {}, while timeline 1 went on",
            branch_lsn(&s.root().join("copy/data"))
        )),
        "{status}"
    );
    let out = s.restore("tl1", &["--backup", &ids[2]]);
    assert!(out.status.success(), "{}", describe(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("holds timeline 2, which left timeline 1")
            && err.contains("will refuse to recover this backup to latest")
            && err.contains("recovery_target_timeline = 'current'"),
        "{err}"
    );
    // The advice works: timeline 1 replays to its end.
    let dir = s.root().join("tl1");
    let auto = dir.join("data/postgresql.auto.conf");
    let mut conf = std::fs::read_to_string(&auto).unwrap();
    conf.push_str("recovery_target_timeline = 'current'\n");
    std::fs::write(&auto, conf).unwrap();
    let mut tl1 = PgServer::existing(&dir, &dir.join("data"), vec![]);
    tl1.append_conf("archive_mode = off");
    tl1.start();
    tl1.wait_promoted();
    assert_eq!(Setup::batches(&tl1), "1:1000 2:30000 3:30000");

    // A restore of the timeline-2 backup has nothing to warn about.
    let out = s.restore("tl2-again", &["--backup", &on_tl2]);
    assert!(out.status.success(), "{}", describe(&out));
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("timeline"),
        "{}",
        describe(&out)
    );
}

/// Where a copy's timeline 2 left timeline 1, from its history file.
fn branch_lsn(copy_data: &Path) -> String {
    let history = std::fs::read_to_string(copy_data.join("pg_wal/00000002.history")).unwrap();
    history.split('\t').nth(1).unwrap().to_string()
}
