//! Randomized point-in-time recovery: a history of batches with several
//! backups among them and a timeline switch (a point-in-time copy that
//! archives timeline 2 into the same repository), every batch's time, LSN,
//! xid and restore point recorded with the rows its server had then; random
//! targets of every kind on both timelines are restored (walvault choosing
//! the backup) and must hold exactly those rows. `make test` restores a few;
//! the fault suite (`make chaos`) restores 20 on each backend.

#[path = "common/archiving.rs"]
mod archiving;
mod common;

use archiving::{Rng, report};
use common::*;
use std::time::Duration;

/// What the server held right after one batch committed.
struct Mark {
    batch: u32,
    /// The timeline the batch was written on.
    timeline: u32,
    rows: u64,
    /// A moment after this batch's commit and before the next one's.
    time: String,
    /// Just after the commit and the restore point.
    lsn: String,
    xid: String,
    name: String,
}

#[derive(Clone, Copy, Debug)]
enum Kind {
    Time,
    Lsn,
    Xid,
    Name,
}

fn seed() -> u64 {
    std::env::var("WALVAULT_PITR_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        })
        | 1
}

/// Batches `batches` on `server` (timeline `timeline`), on top of `rows`
/// rows: a backup before those `backup_before` picks, a WAL switch after
/// every third; each batch's mark is pushed onto `marks`.
fn write_batches(
    s: &Setup,
    server: &PgServer,
    timeline: u32,
    batches: std::ops::RangeInclusive<u32>,
    backup_before: &dyn Fn(u32) -> bool,
    mut rows: u64,
    marks: &mut Vec<Mark>,
) {
    for batch in batches {
        if backup_before(batch) {
            s.backup_of(server);
        }
        let n = 50 + u64::from(batch) * 7;
        let xid = server.sql(&format!(
            "WITH ins AS (INSERT INTO t SELECT {batch}, g FROM generate_series(1, {n}) g \
             RETURNING 1) SELECT txid_current() FROM ins LIMIT 1"
        ));
        rows += n;
        let name = format!("after_{batch}");
        server.sql(&format!("SELECT pg_create_restore_point('{name}')"));
        let lsn = server.sql("SELECT pg_current_wal_lsn()");
        // Commit times are in microseconds: leave room on both sides.
        std::thread::sleep(Duration::from_millis(40));
        let time = server.sql("SELECT clock_timestamp()");
        std::thread::sleep(Duration::from_millis(40));
        if batch % 3 == 0 {
            server.switch_wal();
        }
        marks.push(Mark {
            batch,
            timeline,
            rows,
            time,
            lsn,
            xid,
            name,
        });
    }
    // A commit after the last mark: recovery to a time target stops at the
    // first commit after it, and with none archived past the target it would
    // reach the end of WAL first and refuse to finish ("recovery ended before
    // configured recovery target was reached").
    server.sql(&format!("CREATE TABLE history_ends_{timeline} ()"));
    let last = server.switch_wal();
    server.wait_archived(&last);
}

/// Timeline 1: twelve batches of different sizes on the primary, a backup
/// before batches 1, 5 and 9. Timeline 2: a point-in-time copy restored
/// from the repository to batch `branch`'s restore point, archiving into
/// the same repository, writes batches 13 to 18 with a backup of its own
/// before batch 16. Returns the marks of both, oldest first on each.
fn history(s: &mut Setup, branch: u32) -> Vec<Mark> {
    s.primary.sql("CREATE TABLE t (batch int, id int)");
    let mut marks = vec![];
    write_batches(s, &s.primary, 1, 1..=12, &|b| b % 4 == 1, 0, &mut marks);
    s.primary.stop();

    let at = &marks[branch as usize - 1];
    let copy = s.restore_as_is("copy", &["--name", &at.name]);
    copy.wait_promoted();
    assert_eq!(
        copy.sql("SELECT timeline_id FROM pg_control_checkpoint()"),
        "2"
    );
    let rows = at.rows;
    assert_eq!(
        copy.sql("SELECT count(*) || ':' || max(batch) FROM t"),
        format!("{rows}:{branch}"),
        "the copy restored to after batch {branch}"
    );
    write_batches(s, &copy, 2, 13..=18, &|b| b == 16, rows, &mut marks);
    marks
}

fn random_targets(backend: &str, repo_for: &dyn Fn(&std::path::Path) -> RepoTarget, count: usize) {
    let mut s = setup(repo_for);
    let seed = seed();
    let mut rng = Rng(seed);
    let branch = 5 + rng.below(4) as u32;
    let marks = history(&mut s, branch);
    let on_2: Vec<&Mark> = marks.iter().filter(|m| m.timeline == 2).collect();
    let left_behind: Vec<&Mark> = marks
        .iter()
        .filter(|m| m.timeline == 1 && m.batch > branch)
        .collect();
    let mut results = vec![];
    for i in 0..count {
        // The first two are the cases only a second timeline has: a mark on
        // it, and one timeline 1 reached after timeline 2 left it.
        let mark = match i {
            0 => on_2[rng.below(on_2.len() as u64) as usize],
            1 => left_behind[rng.below(left_behind.len() as u64) as usize],
            _ => &marks[rng.below(marks.len() as u64) as usize],
        };
        let kind = [Kind::Time, Kind::Lsn, Kind::Xid, Kind::Name][rng.below(4) as usize];
        let (flag, value) = match kind {
            Kind::Time => ("--time", mark.time.as_str()),
            Kind::Lsn => ("--lsn", mark.lsn.as_str()),
            Kind::Xid => ("--xid", mark.xid.as_str()),
            Kind::Name => ("--name", mark.name.as_str()),
        };
        // Timeline 2 is the latest (the default); timeline 1 past the
        // branch needs naming; before it, both lead there.
        let stay_on_1 = mark.timeline == 1 && (mark.batch > branch || rng.below(2) == 0);
        let mut args = vec![flag, value];
        if stay_on_1 {
            args.extend(["--target-timeline", "1"]);
        }
        let name = format!("target-{i}");
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let server = s.restore_and_start(&name, &args);
            server.wait_promoted();
            server.sql("SELECT count(*) || ':' || coalesce(max(batch), 0) FROM t")
        }));
        let want = format!("{}:{}", mark.rows, mark.batch);
        results.push(format!(
            "{kind:?} after batch {} on timeline {}{} ({value}): {}",
            mark.batch,
            mark.timeline,
            if stay_on_1 {
                ", --target-timeline 1"
            } else {
                ""
            },
            match outcome {
                Ok(got) if got == want => "exact".to_string(),
                Ok(got) => format!("got {got}, want {want}"),
                Err(panic) => {
                    let text = panic
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| panic.downcast_ref::<&str>().map(|t| t.to_string()))
                        .unwrap_or_default();
                    format!(
                        "failed ({}), want {want}",
                        text.lines().next().unwrap_or("").replace('|', "/")
                    )
                }
            }
        ));
        let _ = std::fs::remove_dir_all(s.root().join(name));
    }
    let wrong: Vec<&String> = results.iter().filter(|r| !r.ends_with("exact")).collect();
    eprintln!("seed {seed}:\n{}", results.join("\n"));
    report(&format!(
        "## 6. Randomized point-in-time recovery, {backend}\n\n\
             Seed {seed}. Timeline 1: twelve batches of rows with a backup before batches 1, \
             5 and 9. Timeline switch: a point-in-time copy restored to batch {branch} \
             promotes to timeline 2, archiving into the same repository, and writes batches \
             13 to 18 with a backup of its own before batch 16. {count} random targets \
             (time, LSN, xid, restore point) on both timelines, among them at least one on \
             timeline 2 (restored to the default latest timeline) and one on timeline 1 after \
             the branch (--target-timeline 1), walvault choosing the backup; each restored \
             server compared with the rows its timeline held at that target.\n\n| target | result |\n|---|---|\n{}\n\n\
             Verdict: **{} of {count} exact**\n",
        results
            .iter()
            .map(|r| {
                // The target ends at its value's closing parenthesis.
                let (t, v) = r.split_once("): ").unwrap_or((r, ""));
                format!("| {t}) | {v} |")
            })
            .collect::<Vec<_>>()
            .join("\n"),
        count - wrong.len()
    ));
    assert!(
        wrong.is_empty(),
        "seed {seed} (rerun with WALVAULT_PITR_SEED): {wrong:#?}"
    );
}

#[test]
fn random_targets_filesystem() {
    random_targets(
        "filesystem",
        &|root| RepoTarget::local(&root.join("repo")),
        4,
    );
}

#[test]
#[ignore = "the fault suite: make chaos"]
fn twenty_random_targets_filesystem() {
    random_targets(
        "filesystem",
        &|root| RepoTarget::local(&root.join("repo")),
        20,
    );
}

#[test]
#[ignore = "the fault suite: make chaos"]
fn twenty_random_targets_s3() {
    let s3 = S3Server::start();
    random_targets("S3", &|_| s3.target("pitr-random"), 20);
}
