//! A primary under pgbench load whose archive_command keeps a shadow copy of
//! every segment walvault said it stored, and the checks that prove nothing
//! was lost afterwards: the fault suite's scenarios (kill storm, collisions)
//! differ in what they do meanwhile, not in what they prove.

#![allow(dead_code)]

use crate::common::*;
use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

/// Which store a scenario runs on.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Backend {
    Filesystem,
    S3,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Filesystem => "filesystem",
            Backend::S3 => "S3",
        }
    }

    /// A repository on this backend under `root`, and the S3 server that
    /// holds it (kept running as long as the guard lives).
    pub fn repository(self, root: &Path) -> (RepoTarget, Option<S3Server>) {
        match self {
            Backend::Filesystem => (RepoTarget::local(&root.join("repo")), None),
            Backend::S3 => {
                let s3 = S3Server::start();
                (s3.target("repo"), Some(s3))
            }
        }
    }
}

/// Appends a scenario's section to the report named by
/// `WALVAULT_CHAOS_REPORT`, if one is being written.
pub fn report(section: &str) {
    eprintln!("{section}");
    if let Some(path) = std::env::var_os("WALVAULT_CHAOS_REPORT") {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .unwrap();
        writeln!(f, "{section}").unwrap();
    }
}

/// A small xorshift generator: a scenario's choices, reproducible from a
/// seed printed in the report.
pub struct Rng(pub u64);

impl Rng {
    pub fn from_clock() -> Rng {
        Rng(std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
            | 1)
    }
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// Sums that tell whether two pgbench databases hold the same rows.
pub fn pgbench_fingerprint(server: &PgServer) -> String {
    server.sql(
        "SELECT (SELECT count(*) FROM pgbench_history) || ':' || \
                (SELECT sum(abalance) FROM pgbench_accounts) || ':' || \
                (SELECT sum(bbalance) FROM pgbench_branches) || ':' || \
                (SELECT sum(tbalance) FROM pgbench_tellers)",
    )
}

/// Exit codes by verb ("backup 0", "prune 3", "verify signal"), counted.
pub type Outcomes = BTreeMap<String, usize>;

pub fn count_outcome(outcomes: &mut Outcomes, verb: &str, out: &Output) {
    let code = out.status.code().map_or("signal".into(), |c| c.to_string());
    *outcomes.entry(format!("{verb} {code}")).or_default() += 1;
}

pub fn outcomes_line(outcomes: &Outcomes) -> String {
    outcomes
        .iter()
        .map(|(v, n)| format!("{v}: {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A primary with 1 MiB segments archiving into `repo`, whose
/// archive_command copies each segment to `shadow` only after walvault
/// exited 0: exactly the set PostgreSQL may recycle.
pub struct ShadowedPrimary {
    // Fields drop in order: the server stops before its directory goes.
    pub primary: PgServer,
    pub repo: RepoTarget,
    pub bin: PathBuf,
    pub shadow: PathBuf,
    pub root: PathBuf,
}

impl ShadowedPrimary {
    /// Starts the primary under `root` and fills pgbench's tables (scale 4).
    pub fn start(root: &Path, bin: &Path, repo: &RepoTarget) -> ShadowedPrimary {
        let shadow = root.join("shadow");
        std::fs::create_dir(&shadow).unwrap();
        give_to_postgres(&shadow);
        let archive_command = format!(
            "{} && cp %p {}/%f.tmp && mv {}/%f.tmp {}/%f",
            repo.push_command(bin),
            shadow.display(),
            shadow.display(),
            shadow.display()
        );
        let mut primary = PgServer::init(
            &root.join("primary"),
            PgConfig {
                wal_segsize_mb: 1,
                conf: &format!(
                    "archive_mode = on\narchive_command = '{archive_command}'\narchive_timeout = 0"
                ),
                env: vec![],
            },
        );
        primary.start();
        let me = ShadowedPrimary {
            primary,
            repo: repo.clone(),
            bin: bin.to_path_buf(),
            shadow,
            root: root.to_path_buf(),
        };
        run_capture(me.pgbench().args(["-i", "-q", "-s", "4", "postgres"]));
        me
    }

    pub fn pgbench(&self) -> Command {
        let mut c = Command::new("pgbench");
        c.arg("-h").arg(&self.primary.socket_dir).args([
            "-p",
            &self.primary.port.to_string(),
            "-U",
            "postgres",
        ]);
        c
    }

    /// pgbench with two clients until killed (at most ten minutes).
    pub fn start_load(&self) -> Child {
        self.pgbench()
            .args(["-c", "2", "-T", "600", "-n", "postgres"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    }

    /// `walvault backup` of the primary, as the postgres OS user (like a
    /// DBA's cron job, leaving the repository writable for the archiver).
    pub fn backup_command(&self, archive_timeout: u32) -> Command {
        let mut c = self.repo.walvault_as_postgres(&self.bin);
        c.envs(self.primary.libpq_env())
            .args(["backup", "--archive-timeout", &archive_timeout.to_string()])
            .arg("--pgdata")
            .arg(&self.primary.data);
        c
    }

    /// After the faults: drains archiving, takes a backup nobody disturbs,
    /// stops the primary and proves what users rely on (see [`Proof`]).
    /// `spool` is the spool a standby used during the faults (its leftovers
    /// must never be handed over wrongly), if one did.
    pub fn prove(&mut self, spool_dir_of: Option<&Path>) -> Proof {
        let last = self.primary.switch_wal();
        self.primary.wait_archived(&last);
        let out = self.backup_command(120).output().unwrap();
        assert!(
            out.status.success(),
            "backup after the faults: {}",
            describe(&out)
        );
        let last = self.primary.switch_wal();
        self.primary.wait_archived(&last);
        let final_rows = pgbench_fingerprint(&self.primary);
        // Archiving stops for the restores: they must see the same end.
        self.primary.stop();

        let backups = list_backups(&self.repo, &self.bin);
        // prune deletes the WAL before its oldest kept backup: the rest of
        // what PostgreSQL was told is archived must fetch byte-identical.
        let oldest_needed = backups
            .iter()
            .map(|b| lsn_segno(b["start_lsn"].as_str().unwrap()))
            .min()
            .expect("a backup was just taken");
        let mut shadowed: Vec<PathBuf> = std::fs::read_dir(&self.shadow)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| !p.to_string_lossy().ends_with(".tmp"))
            .collect();
        shadowed.sort();
        let needed: Vec<&PathBuf> = shadowed
            .iter()
            .filter(|p| {
                let name = p.file_name().unwrap().to_str().unwrap();
                // A backup's history file goes with the backup; a
                // timeline's history file is kept for good.
                name.ends_with(".history") || name_segno(&name[..24]) >= oldest_needed
            })
            .collect();
        // Through a standby's spool: leftovers of killed fetches and
        // prefetch workers must never be handed over as a segment.
        let standby = self.root.join("proof-standby");
        let wal = standby.join("pg_wal");
        std::fs::create_dir_all(&wal).unwrap();
        std::fs::write(standby.join("standby.signal"), b"").unwrap();
        let spool = spool_dir_of.map_or(wal.join("walvault-spool"), Path::to_path_buf);
        let mut lost = vec![];
        for original in &needed {
            let name = original.file_name().unwrap().to_str().unwrap();
            let target = wal.join("RECOVERYXLOG");
            let out = self
                .repo
                .walvault(&self.bin)
                .current_dir(&standby)
                .args(["fetch", "--spool"])
                .arg(&spool)
                .arg(name)
                .arg(&target)
                .output()
                .unwrap();
            if !out.status.success()
                || std::fs::read(&target).ok() != Some(std::fs::read(original).unwrap())
            {
                lost.push(format!("{name} ({})", describe(&out).replace('\n', " ")));
            }
            let _ = std::fs::remove_file(&target);
        }
        wait_for_spool_workers(&spool);

        let verify = self
            .repo
            .walvault(&self.bin)
            .arg("verify")
            .output()
            .unwrap();

        let mut restores = vec![];
        for (i, b) in backups.iter().enumerate() {
            let id = b["id"].as_str().unwrap();
            let target = self.root.join(format!("proof-restore-{i}"));
            let out = self
                .repo
                .walvault_as_postgres(&self.bin)
                .arg("restore")
                .arg("--pgdata")
                .arg(target.join("data"))
                .args(["--backup", id])
                .output()
                .unwrap();
            if !out.status.success() {
                restores.push(format!("{id}: restore failed: {}", describe(&out)));
                continue;
            }
            // Its restore_command reaches the repository with the same settings.
            let mut server =
                PgServer::existing(&target, &target.join("data"), self.repo.env.clone());
            server.append_conf("archive_mode = off");
            server.start();
            server.wait_promoted();
            let rows = pgbench_fingerprint(&server);
            restores.push(if rows == final_rows {
                format!("{id}: exact")
            } else {
                format!("{id}: rows {rows}, primary had {final_rows}")
            });
            drop(server);
            let _ = std::fs::remove_dir_all(&target);
        }
        Proof {
            shadowed: shadowed.len(),
            needed: needed.len(),
            lost,
            verify,
            restores,
        }
    }
}

/// What [`ShadowedPrimary::prove`] found.
pub struct Proof {
    /// Segments PostgreSQL was told are archived.
    pub shadowed: usize,
    /// Of those, the ones no prune may have deleted (from the oldest kept
    /// backup's start on).
    pub needed: usize,
    /// Needed segments that did not fetch byte-identical.
    pub lost: Vec<String>,
    pub verify: Output,
    /// "ID: exact", or what went wrong, per backup restored to latest.
    pub restores: Vec<String>,
}

impl Proof {
    pub fn exact(&self) -> usize {
        self.restores
            .iter()
            .filter(|r| r.ends_with(": exact"))
            .count()
    }

    pub fn nothing_lost(&self) -> bool {
        self.lost.is_empty()
            && self.verify.status.success()
            && !self.restores.is_empty()
            && self.exact() == self.restores.len()
    }

    /// The table rows every scenario reports.
    pub fn rows(&self) -> String {
        format!(
            "| segments PostgreSQL was told are archived (shadow copies) | {} |\n\
             | of those, after the oldest kept backup's start (prune keeps them) | {} |\n\
             | of those, not fetched byte-identical through the standby's spool | {} |\n\
             | verify afterwards | exit {} |\n\
             | backups restored to latest with exactly the primary's rows | {} of {} |\n",
            self.shadowed,
            self.needed,
            self.lost.len(),
            self.verify
                .status
                .code()
                .map_or("by a signal".to_string(), |c| c.to_string()),
            self.exact(),
            self.restores.len()
        )
    }

    /// What was lost, for the report (empty when nothing was).
    pub fn losses(&self) -> String {
        let mut s = String::new();
        for l in &self.lost {
            s += &format!("- lost: {l}\n");
        }
        for r in self.restores.iter().filter(|r| !r.ends_with(": exact")) {
            s += &format!("- restore: {r}\n");
        }
        if !self.verify.status.success() {
            s += &format!("- verify: {}\n", describe(&self.verify).replace('\n', " "));
        }
        s
    }

    pub fn verdict(&self) -> &'static str {
        match self.nothing_lost() {
            true => "nothing lost",
            false => "LOSS OR DAMAGE",
        }
    }

    pub fn assert_nothing_lost(&self) {
        assert!(self.lost.is_empty(), "segments lost: {:#?}", self.lost);
        assert!(
            self.verify.status.success(),
            "verify: {}",
            describe(&self.verify)
        );
        assert!(!self.restores.is_empty(), "no backup to restore");
        assert_eq!(
            self.exact(),
            self.restores.len(),
            "restores: {:#?}",
            self.restores
        );
    }
}

/// The repository's backups, `walvault list --json`.
pub fn list_backups(repo: &RepoTarget, bin: &Path) -> Vec<serde_json::Value> {
    let out = repo
        .walvault(bin)
        .args(["list", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", describe(&out));
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    list.as_array().unwrap().clone()
}

/// The first segment prune keeps (the oldest backup's start), asked while
/// faults may kill the asking process too: `None` when it cannot tell.
pub fn first_kept_segno(repo: &RepoTarget, bin: &Path) -> Option<u64> {
    for _ in 0..5 {
        let out = repo.walvault(bin).args(["list", "--json"]).output().ok()?;
        if !out.status.success() {
            continue;
        }
        let list: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        return list
            .as_array()?
            .iter()
            .filter_map(|b| Some(lsn_segno(b["start_lsn"].as_str()?)))
            .min();
    }
    None
}

/// The number of the 1 MiB segment holding `lsn` ("0/2000028").
pub fn lsn_segno(lsn: &str) -> u64 {
    let (hi, lo) = lsn.split_once('/').unwrap();
    let lsn = (u64::from_str_radix(hi, 16).unwrap() << 32) | u64::from_str_radix(lo, 16).unwrap();
    lsn >> 20
}

/// The number of the 1 MiB segment a WAL file name (timeline, log, seg)
/// names.
pub fn name_segno(name: &str) -> u64 {
    let log = u64::from_str_radix(&name[8..16], 16).unwrap();
    let seg = u64::from_str_radix(&name[16..24], 16).unwrap();
    log * 4096 + seg
}
