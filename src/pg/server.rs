//! A scratch PostgreSQL server: found, started and stopped as the right OS
//! user in a private directory, reachable only by its own user over a
//! private socket (what `walvault drill` restores into).

use crate::error::{Context, Error, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

pub fn is_root() -> bool {
    crate::sys::effective_uid() == 0
}

/// `--pg-bin`, else `pg_config --bindir`, else the directory of `postgres` on PATH.
pub fn find_bindir(given: Option<&Path>) -> Result<PathBuf> {
    if let Some(d) = given {
        return Ok(d.to_path_buf());
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output()
        && out.status.success()
    {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if dir.join("postgres").exists() {
            return Ok(dir);
        }
    }
    std::env::var_os("PATH")
        .and_then(|paths| std::env::split_paths(&paths).find(|p| p.join("postgres").exists()))
        .ok_or_else(|| Error::usage("cannot find PostgreSQL's server binaries: give --pg-bin DIR"))
}

/// A command run as the `postgres` OS user when we are root (the server
/// refuses to run as root).
pub fn server_command(program: &Path) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

pub fn chown_to_postgres(path: &Path) -> Result<()> {
    if !is_root() {
        return Ok(());
    }
    let status = Command::new("chown")
        .args(["-R", "postgres:"])
        .arg(path)
        .status()
        .context(|| "cannot run chown".into())?;
    if !status.success() {
        return Err(Error::io(format!(
            "cannot hand {} to the postgres OS user",
            path.display()
        )));
    }
    Ok(())
}

/// Makes the scratch directory the way mkdtemp(3) does: a random name, mode
/// 0700, and never a directory or link that was there before (the system
/// temp folder is writable by every local user).
pub fn make_private_dir(parent: &Path) -> Result<PathBuf> {
    crate::sys::make_temporary_dir(&parent.join("walvault-drill-")).map_err(|e| {
        Error::io(format!(
            "cannot create a scratch directory in {}: {e}; give --scratch DIR",
            parent.display()
        ))
    })
}

/// The name of the OS user this process runs as (what peer authentication sees).
pub fn effective_user_name() -> Result<String> {
    let uid = crate::sys::effective_uid();
    crate::sys::user_name(uid).ok_or_else(|| {
        Error::io(format!(
            "cannot find the name of OS user {uid}; the drill lets only that user into its server"
        ))
    })
}

/// A name quoted for pg_hba.conf / pg_ident.conf (quoted: never a keyword).
pub fn auth_name(name: &str) -> Result<String> {
    if name.is_empty() || name.contains(['"', '\n', '\r']) {
        return Err(Error::usage(format!(
            "user name '{}' cannot be used for the drill's server; set PGUSER to another",
            name.escape_debug()
        )));
    }
    Ok(format!("\"{name}\""))
}

/// Only peer connections, and only as `db_user` from the mapped OS user.
pub fn hba_text(db_user: &str) -> Result<String> {
    Ok(format!(
        "# walvault drill: the drill's OS user only, on the private socket\nlocal all {} peer map=walvault_drill\n",
        auth_name(db_user)?
    ))
}

pub fn ident_text(os_user: &str, db_user: &str) -> Result<String> {
    Ok(format!(
        "walvault_drill {} {}\n",
        auth_name(os_user)?,
        auth_name(db_user)?
    ))
}

/// Creates a file that must not exist yet, never through a link.
pub fn create_new_file(path: &Path, data: &[u8]) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .and_then(|mut f| f.write_all(data))
        .context(|| format!("cannot create {}", path.display()))
}

/// Appends to an existing regular file, never through a link.
pub fn append_to_file(path: &Path, data: &[u8]) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .append(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .and_then(|mut f| f.write_all(data))
        .context(|| format!("cannot write {}", path.display()))
}

pub struct Scratch {
    pub dir: PathBuf,
    pub data: PathBuf,
    pub bindir: PathBuf,
    pub started: bool,
}

impl Scratch {
    pub fn log(&self) -> PathBuf {
        self.dir.join("server.log")
    }

    pub fn log_tail(&self) -> String {
        use std::io::{Read, Seek, SeekFrom};
        use std::os::unix::fs::OpenOptionsExt;
        // The server's OS user writes in this directory: read the log's end
        // without following a link it may have put there, and lossily.
        let mut raw = vec![];
        let _ = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(self.log())
            .and_then(|mut f| {
                let len = f.metadata()?.len();
                f.seek(SeekFrom::Start(len.saturating_sub(64 << 10)))?;
                f.take(64 << 10).read_to_end(&mut raw)
            });
        let log = String::from_utf8_lossy(&raw);
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    pub fn stop(&mut self) {
        if self.started {
            let _ = server_command(&self.bindir.join("pg_ctl"))
                .args(["-D"])
                .arg(&self.data)
                .args(["-m", "fast", "-w", "-t", "60", "stop"])
                .output();
            self.started = false;
        }
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
