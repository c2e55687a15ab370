//! Randomized point-in-time recovery: a history of batches with several
//! backups among them, every batch's time, LSN, xid and restore point
//! recorded with the rows the primary had then; random targets of every
//! kind are restored (walvault choosing the backup) and must hold exactly
//! those rows. `make test` restores a few; the fault suite (`make chaos`)
//! restores 20 on each backend.

mod common;

use common::*;
use std::time::Duration;

/// What the primary held right after one batch committed.
struct Mark {
    batch: u32,
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

/// xorshift: the choice of targets, reproducible from the printed seed.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x % n.max(1)
    }
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

/// Twelve batches of different sizes, a backup before batches 1, 5 and 9,
/// a WAL switch now and then; returns the marks and the number of backups.
fn history(s: &Setup) -> Vec<Mark> {
    let p = &s.primary;
    p.sql("CREATE TABLE t (batch int, id int)");
    let mut marks = vec![];
    let mut rows = 0u64;
    for batch in 1..=12u32 {
        if batch % 4 == 1 {
            s.backup();
        }
        let n = 50 + u64::from(batch) * 7;
        let xid = p.sql(&format!(
            "WITH ins AS (INSERT INTO t SELECT {batch}, g FROM generate_series(1, {n}) g \
             RETURNING 1) SELECT txid_current() FROM ins LIMIT 1"
        ));
        rows += n;
        let name = format!("after_{batch}");
        p.sql(&format!("SELECT pg_create_restore_point('{name}')"));
        let lsn = p.sql("SELECT pg_current_wal_lsn()");
        // Commit times are in microseconds: leave room on both sides.
        std::thread::sleep(Duration::from_millis(40));
        let time = p.sql("SELECT clock_timestamp()");
        std::thread::sleep(Duration::from_millis(40));
        if batch % 3 == 0 {
            p.switch_wal();
        }
        marks.push(Mark {
            batch,
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
    p.sql("CREATE TABLE history_ends ()");
    let last = p.switch_wal();
    p.wait_archived(&last);
    marks
}

fn random_targets(backend: &str, repo_for: &dyn Fn(&std::path::Path) -> RepoTarget, count: usize) {
    let s = setup(repo_for);
    let marks = history(&s);
    let seed = seed();
    let mut rng = Rng(seed);
    let mut results = vec![];
    for i in 0..count {
        let mark = &marks[rng.below(marks.len() as u64) as usize];
        let kind = [Kind::Time, Kind::Lsn, Kind::Xid, Kind::Name][rng.below(4) as usize];
        let (flag, value) = match kind {
            Kind::Time => ("--time", mark.time.as_str()),
            Kind::Lsn => ("--lsn", mark.lsn.as_str()),
            Kind::Xid => ("--xid", mark.xid.as_str()),
            Kind::Name => ("--name", mark.name.as_str()),
        };
        let server = s.restore_and_start(&format!("target-{i}"), &[flag, value]);
        server.wait_promoted();
        let got = server.sql("SELECT count(*) || ':' || coalesce(max(batch), 0) FROM t");
        let want = format!("{}:{}", mark.rows, mark.batch);
        results.push(format!(
            "{kind:?} after batch {} ({value}): {}",
            mark.batch,
            if got == want {
                "exact".to_string()
            } else {
                format!("got {got}, want {want}")
            }
        ));
        drop(server);
        let _ = std::fs::remove_dir_all(s.root().join(format!("target-{i}")));
    }
    let wrong: Vec<&String> = results.iter().filter(|r| !r.ends_with("exact")).collect();
    eprintln!("seed {seed}:\n{}", results.join("\n"));
    if let Some(path) = std::env::var_os("WALVAULT_CHAOS_REPORT") {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .unwrap();
        writeln!(
            f,
            "## 6. Randomized point-in-time recovery, {backend}\n\n\
             Seed {seed}. Twelve batches of rows with a backup before batches 1, 5 and 9; \
             {count} random targets (time, LSN, xid, restore point), walvault choosing the \
             backup; each restored server compared with the rows the primary had at that \
             target.\n\n| target | result |\n|---|---|\n{}\n\n\
             Verdict: **{} of {count} exact**\n",
            results
                .iter()
                .map(|r| {
                    let (t, v) = r.rsplit_once(": ").unwrap_or((r, ""));
                    format!("| {t} | {v} |")
                })
                .collect::<Vec<_>>()
                .join("\n"),
            count - wrong.len()
        )
        .unwrap();
    }
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
