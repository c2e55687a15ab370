//! Real parts for the integration tests: a PostgreSQL 15 server in a temp
//! dir on a unix socket (run as the `postgres` OS user when we are root, as
//! initdb and postgres refuse root), and an S3-compatible server (s3s-fs) on
//! 127.0.0.1. Every server started here is stopped when its guard drops.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub fn is_root() -> bool {
    run_capture(Command::new("id").arg("-u")).trim() == "0"
}

pub fn run_capture(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// uid and gid of the `postgres` OS user.
fn postgres_ids() -> (u32, u32) {
    let uid = run_capture(Command::new("id").args(["-u", "postgres"]))
        .trim()
        .parse()
        .unwrap();
    let gid = run_capture(Command::new("id").args(["-g", "postgres"]))
        .trim()
        .parse()
        .unwrap();
    (uid, gid)
}

/// Hands a path we created to the user PostgreSQL runs as.
pub fn give_to_postgres(path: &Path) {
    if is_root() {
        let (uid, gid) = postgres_ids();
        for entry in walkdir::WalkDir::new(path) {
            let entry = entry.unwrap();
            std::os::unix::fs::lchown(entry.path(), Some(uid), Some(gid)).unwrap();
        }
    }
}

/// A command that runs as the PostgreSQL OS user.
pub fn as_postgres(program: impl AsRef<std::ffi::OsStr>) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

/// A scratch directory the PostgreSQL OS user owns; removed on drop.
pub fn scratch() -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("walvault-test-")
        .tempdir()
        .unwrap();
    give_to_postgres(dir.path());
    dir
}

/// The walvault binary under test, copied where the `postgres` user can run it
/// (the checkout may sit in a directory only root can enter).
pub fn install_binary(dir: &Path) -> PathBuf {
    let dest = dir.join("walvault");
    std::fs::copy(env!("CARGO_BIN_EXE_walvault"), &dest).unwrap();
    give_to_postgres(&dest);
    dest
}

thread_local! {
    /// The server binaries this test thread runs instead of the default ones
    /// (see [`with_pg_bindir`]); each test runs on its own thread.
    static BINDIR_OVERRIDE: std::cell::RefCell<Option<PathBuf>> = const { std::cell::RefCell::new(None) };
}

/// Runs `f` with every server it starts (and restores it starts) using the
/// binaries in `bindir`: how the version matrix runs one test body on
/// each major version.
pub fn with_pg_bindir<R>(bindir: &Path, f: impl FnOnce() -> R) -> R {
    BINDIR_OVERRIDE.with(|o| *o.borrow_mut() = Some(bindir.to_path_buf()));
    struct Reset;
    impl Drop for Reset {
        fn drop(&mut self) {
            BINDIR_OVERRIDE.with(|o| *o.borrow_mut() = None);
        }
    }
    let _reset = Reset;
    f()
}

/// PostgreSQL's server binaries: those of [`with_pg_bindir`], else
/// `PG_BINDIR`, else `pg_config --bindir`.
pub fn pg_bindir() -> PathBuf {
    if let Some(dir) = BINDIR_OVERRIDE.with(|o| o.borrow().clone()) {
        return dir;
    }
    default_pg_bindir()
}

/// The default server binaries (Debian's): `PG_BINDIR`, else `pg_config --bindir`.
pub fn default_pg_bindir() -> PathBuf {
    if let Some(dir) = std::env::var_os("PG_BINDIR") {
        return PathBuf::from(dir);
    }
    let out = Command::new("pg_config")
        .arg("--bindir")
        .output()
        .expect("pg_config not found: run 'make setup' to install PostgreSQL");
    let dir = PathBuf::from(String::from_utf8(out.stdout).unwrap().trim());
    assert!(
        dir.join("initdb").exists(),
        "no initdb in {}: run 'make setup'",
        dir.display()
    );
    dir
}

/// Where a repository lives and the environment walvault needs to reach it.
#[derive(Clone, Debug)]
pub struct RepoTarget {
    pub url: String,
    pub env: Vec<(String, String)>,
}

impl RepoTarget {
    pub fn local(path: &Path) -> RepoTarget {
        RepoTarget {
            url: path.display().to_string(),
            env: vec![],
        }
    }

    /// `env A=B ... ` prefix for a shell command line run by PostgreSQL.
    pub fn env_prefix(&self) -> String {
        if self.env.is_empty() {
            return String::new();
        }
        let vars: Vec<String> = self.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        format!("env {} ", vars.join(" "))
    }

    /// The archive_command line that pushes into this repository.
    pub fn push_command(&self, bin: &Path) -> String {
        format!(
            "{}{} --repo {} push %p %f",
            self.env_prefix(),
            bin.display(),
            self.url
        )
    }

    /// A walvault invocation with this repository.
    pub fn walvault(&self, bin: &Path) -> Command {
        let mut c = Command::new(bin);
        c.arg("--repo").arg(&self.url);
        for (k, v) in &self.env {
            c.env(k, v);
        }
        c
    }
}

pub struct PgServer {
    pub dir: PathBuf,
    pub data: PathBuf,
    pub socket_dir: PathBuf,
    pub port: u16,
    bindir: PathBuf,
    env: Vec<(String, String)>,
    running: bool,
}

/// Options for a fresh cluster.
pub struct PgConfig<'a> {
    pub wal_segsize_mb: u32,
    /// Extra postgresql.conf lines.
    pub conf: &'a str,
    pub env: Vec<(String, String)>,
}

impl PgServer {
    /// initdb in `dir/data` (dir owned by the postgres user).
    pub fn init(dir: &Path, cfg: PgConfig) -> PgServer {
        let bindir = pg_bindir();
        let data = dir.join("data");
        let socket_dir = dir.join("sock");
        std::fs::create_dir_all(&socket_dir).unwrap();
        give_to_postgres(dir);
        let out = as_postgres(bindir.join("initdb"))
            .args([
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
                "-E",
                "UTF8",
                "--locale=C",
            ])
            .arg(format!("--wal-segsize={}", cfg.wal_segsize_mb))
            .arg("-D")
            .arg(&data)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let server = PgServer {
            dir: dir.to_path_buf(),
            data,
            socket_dir,
            port: 5432,
            bindir,
            env: cfg.env,
            running: false,
        };
        server.append_conf(&format!(
            "listen_addresses = ''\nunix_socket_directories = '{}'\nport = {}\n\
             fsync = off\nshared_buffers = 16MB\nmax_wal_senders = 4\nwal_level = replica\n\
             max_wal_size = 256MB\nlog_min_messages = warning\n{}\n",
            server.socket_dir.display(),
            server.port,
            cfg.conf
        ));
        server
    }

    /// A server over an existing data directory (a restored copy).
    pub fn existing(dir: &Path, data: &Path, env: Vec<(String, String)>) -> PgServer {
        let socket_dir = dir.join("sock");
        std::fs::create_dir_all(&socket_dir).unwrap();
        give_to_postgres(dir);
        PgServer {
            dir: dir.to_path_buf(),
            data: data.to_path_buf(),
            socket_dir,
            port: 5432,
            bindir: pg_bindir(),
            env,
            running: false,
        }
    }

    pub fn append_conf(&self, text: &str) {
        let path = self.data.join("postgresql.conf");
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        writeln!(f, "{text}").unwrap();
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join("server.log")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    pub fn start(&mut self) {
        let mut cmd = as_postgres("env");
        for (k, v) in &self.env {
            cmd.arg(format!("{k}={v}"));
        }
        let out = cmd
            .arg(self.bindir.join("pg_ctl"))
            .args(["-w", "-t", "120", "-D"])
            .arg(&self.data)
            .arg("-l")
            .arg(self.log_path())
            .arg("-o")
            .arg(format!(
                "-c unix_socket_directories={} -c port={}",
                self.socket_dir.display(),
                self.port
            ))
            .arg("start")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "pg_ctl start failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        self.running = true;
    }

    pub fn stop(&mut self) {
        if self.running {
            let _ = as_postgres(self.bindir.join("pg_ctl"))
                .args(["-w", "-t", "60", "-m", "fast", "-D"])
                .arg(&self.data)
                .arg("stop")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            self.running = false;
        }
    }

    pub fn psql_command(&self) -> Command {
        // Server-only builds (the other major versions) ship no psql: the
        // default installation's psql speaks to every maintained version.
        let own = self.bindir.join("psql");
        let psql = if own.exists() {
            own
        } else {
            default_pg_bindir().join("psql")
        };
        let mut c = Command::new(psql);
        c.arg("-h").arg(&self.socket_dir).args([
            "-p",
            &self.port.to_string(),
            "-U",
            "postgres",
            "-d",
            "postgres",
            "-AtX",
            "-v",
            "ON_ERROR_STOP=1",
        ]);
        c
    }

    /// Runs SQL and returns psql's unaligned output, trimmed.
    pub fn sql(&self, sql: &str) -> String {
        let out = self.psql_command().arg("-c").arg(sql).output().unwrap();
        assert!(
            out.status.success(),
            "psql {sql:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }

    /// Switches to a new segment and returns the name of the one just completed.
    pub fn switch_wal(&self) -> String {
        // pg_switch_wal() returns the end of the finished segment, and
        // pg_walfile_name() names the segment that ends there (it reads a
        // boundary as the end of the segment before; pg_lsn arithmetic
        // would need PostgreSQL 14).
        self.sql("SELECT pg_walfile_name(pg_switch_wal())")
    }

    /// Waits until `segment` (and everything before it) is archived; fails on
    /// any archive failure, with the server log.
    pub fn wait_archived(&self, segment: &str) {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let row = self
                .sql("SELECT coalesce(last_archived_wal, ''), failed_count FROM pg_stat_archiver");
            let (last, failed) = row.split_once('|').unwrap();
            assert_eq!(failed, "0", "archiving failed; server log:\n{}", self.log());
            if last.len() >= 24 && &last[..24] >= segment {
                return;
            }
            // The last file archived may be an older segment's backup
            // history file (`…551.00000028.backup`, readied after the
            // segments pushed ahead): the segment's own status says.
            let done = self
                .data
                .join("pg_wal/archive_status")
                .join(format!("{segment}.done"));
            if done.exists() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{segment} not archived in time; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits for a restored server to finish recovery (promotion).
    pub fn wait_promoted(&self) {
        let deadline = Instant::now() + Duration::from_secs(120);
        while self.sql("SELECT pg_is_in_recovery()") != "f" {
            assert!(
                Instant::now() < deadline,
                "recovery did not finish; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn system_identifier(&self) -> String {
        self.sql("SELECT system_identifier FROM pg_control_system()")
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        self.stop();
    }
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// s3s-fs on 127.0.0.1 with one bucket; killed on drop.
pub struct S3Server {
    child: Child,
    pub port: u16,
    pub data: tempfile::TempDir,
    pub bucket: String,
}

pub const S3_ACCESS_KEY: &str = "walvault-test-access";
pub const S3_SECRET_KEY: &str = "walvault-test-secret-0123456789";

fn s3s_fs_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("S3S_FS") {
        return PathBuf::from(p);
    }
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join(".tools/bin/s3s-fs");
    assert!(
        p.exists(),
        "s3s-fs not found at {}: run 'make tools' (make test does) or set S3S_FS",
        p.display()
    );
    p
}

impl S3Server {
    pub fn start() -> S3Server {
        let data = tempfile::Builder::new()
            .prefix("walvault-s3-")
            .tempdir()
            .unwrap();
        let bucket = "walvault-test".to_string();
        std::fs::create_dir(data.path().join(&bucket)).unwrap();
        // A port can be taken between our probe and the server's bind: retry.
        for _ in 0..5 {
            let port = free_port();
            let mut child = Command::new(s3s_fs_binary())
                .args(["--host", "127.0.0.1", "--port", &port.to_string()])
                .args(["--access-key", S3_ACCESS_KEY, "--secret-key", S3_SECRET_KEY])
                .arg(data.path())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .expect("cannot start s3s-fs");
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return S3Server {
                        child,
                        port,
                        data,
                        bucket,
                    };
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = e.read_to_string(&mut err);
            }
            eprintln!("s3s-fs on port {port} did not start: {err}");
        }
        panic!("could not start s3s-fs");
    }

    pub fn target(&self, prefix: &str) -> RepoTarget {
        RepoTarget {
            url: format!("s3://{}/{prefix}", self.bucket),
            env: vec![
                ("AWS_ACCESS_KEY_ID".into(), S3_ACCESS_KEY.into()),
                ("AWS_SECRET_ACCESS_KEY".into(), S3_SECRET_KEY.into()),
                ("AWS_REGION".into(), "us-east-1".into()),
                (
                    "AWS_ENDPOINT_URL".into(),
                    format!("http://127.0.0.1:{}", self.port),
                ),
                ("AWS_ALLOW_HTTP".into(), "true".into()),
            ],
        }
    }

    /// The file s3s-fs keeps an object in.
    pub fn object_path(&self, prefix: &str, key: &str) -> PathBuf {
        self.data.path().join(&self.bucket).join(prefix).join(key)
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Output with stderr shown in assertion messages.
pub fn describe(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A synthetic but well-formed WAL segment (PostgreSQL 15 page magic) for
/// command-line tests that need no server: `fill` varies the content.
pub fn synthetic_segment(
    name: &str,
    system_identifier: u64,
    segment_size: u32,
    fill: u8,
) -> Vec<u8> {
    let timeline = u32::from_str_radix(&name[0..8], 16).unwrap();
    let log = u64::from_str_radix(&name[8..16], 16).unwrap();
    let seg = u64::from_str_radix(&name[16..24], 16).unwrap();
    let per_log = 0x1_0000_0000u64 / u64::from(segment_size);
    let address = (log * per_log + seg) * u64::from(segment_size);
    let mut b = vec![0u8; segment_size as usize];
    for (i, x) in b.iter_mut().enumerate() {
        *x = ((i as u64).wrapping_mul(2654435761) >> 13) as u8 ^ fill;
    }
    b[0..2].copy_from_slice(&0xD110u16.to_le_bytes());
    b[2..4].copy_from_slice(&2u16.to_le_bytes());
    b[4..8].copy_from_slice(&timeline.to_le_bytes());
    b[8..16].copy_from_slice(&address.to_le_bytes());
    b[16..24].fill(0);
    b[24..32].copy_from_slice(&system_identifier.to_le_bytes());
    b[32..36].copy_from_slice(&segment_size.to_le_bytes());
    b[36..40].copy_from_slice(&8192u32.to_le_bytes());
    b
}

impl RepoTarget {
    /// A walvault invocation run as the PostgreSQL OS user (restores must
    /// leave files the server can own).
    pub fn walvault_as_postgres(&self, bin: &Path) -> Command {
        let mut c = as_postgres("env");
        for (k, v) in &self.env {
            c.arg(format!("{k}={v}"));
        }
        c.arg(bin).arg("--repo").arg(&self.url);
        c
    }
}

impl PgServer {
    /// libpq variables that reach this server.
    pub fn libpq_env(&self) -> Vec<(String, String)> {
        vec![
            ("PGHOST".into(), self.socket_dir.display().to_string()),
            ("PGPORT".into(), self.port.to_string()),
            ("PGUSER".into(), "postgres".into()),
            ("PGDATABASE".into(), "postgres".into()),
        ]
    }
}

/// A primary archiving through walvault, with helpers for backup and restore.
pub struct Setup {
    // Fields drop in order: the server must stop before its directory goes.
    pub primary: PgServer,
    pub bin: PathBuf,
    pub repo: RepoTarget,
    pub dir: tempfile::TempDir,
}

pub fn setup(repo_for: &dyn Fn(&Path) -> RepoTarget) -> Setup {
    let dir = scratch();
    let root = dir.path().to_path_buf();
    let bin = install_binary(&root);
    let repo = repo_for(&root);
    let archive_command = repo.push_command(&bin);
    let mut primary = PgServer::init(
        &root.join("primary"),
        PgConfig {
            wal_segsize_mb: 1,
            conf: &format!("archive_mode = on\narchive_command = '{archive_command}'"),
            env: vec![],
        },
    );
    primary.start();
    Setup {
        dir,
        bin,
        repo,
        primary,
    }
}

impl Setup {
    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    pub fn backup(&self) -> String {
        self.backup_of(&self.primary)
    }

    /// Backs up `server` (the primary, or a copy restored from this
    /// repository that archives into it) and returns the backup's id.
    pub fn backup_of(&self, server: &PgServer) -> String {
        // As the postgres OS user, like a DBA's cron job: the repository
        // stays writable for the archiver.
        let mut cmd = self.repo.walvault_as_postgres(&self.bin);
        let out = cmd
            .envs(server.libpq_env())
            .args(["backup", "--archive-timeout", "60"])
            .arg("--pgdata")
            .arg(&server.data)
            .output()
            .unwrap();
        assert!(out.status.success(), "backup: {}", describe(&out));
        let stdout = String::from_utf8(out.stdout).unwrap();
        let id = stdout
            .split_whitespace()
            .nth(1)
            .unwrap()
            .trim_end_matches(':')
            .to_string();
        assert_eq!(id.len(), 16, "{stdout}");
        id
    }

    pub fn restore(&self, name: &str, args: &[&str]) -> std::process::Output {
        self.repo
            .walvault_as_postgres(&self.bin)
            .arg("restore")
            .arg("--pgdata")
            .arg(self.root().join(name).join("data"))
            .args(args)
            .output()
            .unwrap()
    }

    /// Restores, starts the result and returns the server once recovery ended.
    pub fn restore_and_start(&self, name: &str, args: &[&str]) -> PgServer {
        let out = self.restore(name, args);
        assert!(out.status.success(), "restore {args:?}: {}", describe(&out));
        let dir = self.root().join(name);
        let mut server = PgServer::existing(&dir, &dir.join("data"), self.repo.env.clone());
        // Several restores of one primary must not archive into its repository.
        server.append_conf("archive_mode = off");
        server.start();
        server
    }

    /// Restores into `name` and starts the copy with the settings restore
    /// wrote (no archive_mode override, unlike [`Setup::restore_and_start`]):
    /// by default it archives its new timeline into this repository.
    pub fn restore_as_is(&self, name: &str, args: &[&str]) -> PgServer {
        let out = self.restore(name, args);
        assert!(out.status.success(), "restore {args:?}: {}", describe(&out));
        let dir = self.root().join(name);
        let mut server = PgServer::existing(&dir, &dir.join("data"), self.repo.env.clone());
        server.start();
        server
    }

    pub fn batches(server: &PgServer) -> String {
        server.sql("SELECT string_agg(batch || ':' || n, ' ' ORDER BY batch) FROM (SELECT batch, count(*) n FROM t GROUP BY batch) s")
    }

    pub fn list_json(&self) -> serde_json::Value {
        let out = self
            .repo
            .walvault(&self.bin)
            .args(["list", "--json"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", describe(&out));
        serde_json::from_slice(&out.stdout).unwrap()
    }
}

/// Waits (at most a minute) until no background worker holds a lock in the
/// spool `dir`: push and fetch return before their workers finish.
pub fn wait_for_spool_workers(dir: &Path) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    for stem in ["push-worker", "prefetch-worker"] {
        let lock = dir.join(format!("{stem}.lock"));
        loop {
            let free = match std::fs::File::open(&lock) {
                Ok(file) => file.try_lock().is_ok(),
                Err(_) => true,
            };
            if free {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the {stem} in {} did not finish within a minute",
                dir.display()
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
}

impl S3Server {
    /// Stops the server and keeps its data, as a store outage would.
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts it again after [`S3Server::stop`], on the same port and data,
    /// retrying (bounded) while the port is still being released.
    pub fn restart(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            let mut child = Command::new(s3s_fs_binary())
                .args(["--host", "127.0.0.1", "--port", &self.port.to_string()])
                .args(["--access-key", S3_ACCESS_KEY, "--secret-key", S3_SECRET_KEY])
                .arg(self.data.path())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("cannot start s3s-fs");
            let started = Instant::now();
            while started.elapsed() < Duration::from_secs(10) {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                    self.child = child;
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
            std::thread::sleep(Duration::from_millis(500));
        }
        panic!("could not restart s3s-fs on port {}", self.port);
    }
}
