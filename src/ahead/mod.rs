//! The push-ahead and prefetch workers' shared ground: the spool in pg_wal
//! where they leave their work, their claims and logs, and how they start.

pub mod spool;

/// Starts `walvault <args>` as a background worker unless one of its kind
/// already runs: its own process group (a signal to the command that starts
/// it does not reach it), its lock as stdin, no stdout, stderr to its log in
/// the spool.
/// The starting command returns at once, so PostgreSQL never waits for it.
/// Failing to start one is only a warning: the work is then done on demand.
/// `args` follow `walvault --repo URL <worker verb> --spool DIR`.
pub fn spawn_worker(
    spool: &spool::Spool,
    kind: spool::WorkerKind,
    url: &crate::repository::RepoUrl,
    args: &[std::ffi::OsString],
) {
    use std::os::unix::process::CommandExt;
    use std::process::Stdio;
    // Taken here and handed over as the worker's stdin (see
    // `Spool::inherited_worker_lock`); if it is held, a worker runs already.
    let Some(lock) = spool.lock_worker(kind) else {
        return;
    };
    let started = (|| -> std::io::Result<()> {
        let log = std::fs::File::create(spool.worker_log(kind))?;
        let dir = std::path::absolute(spool.dir())?;
        let mut command = std::process::Command::new(std::env::current_exe()?);
        if kind == spool::WorkerKind::Push {
            // The push worker runs behind PostgreSQL: under load, the
            // archiver's own calls waited in the CPU queue behind its threads
            // (half the time between two calls in a drain). At nice 10 it
            // still gets a share, and every idle cycle; calls wait only for
            // pushes it has under way. The prefetch worker is not lowered:
            // recovery waits on every segment it has claimed.
            crate::sys::run_at_nice(&mut command, 10);
        }
        command
            .arg("--repo")
            .arg(url.to_string())
            .arg(kind.verb())
            .arg("--spool")
            .arg(dir)
            .args(args)
            .stdin(Stdio::from(lock))
            .stdout(Stdio::null())
            .stderr(log)
            .process_group(0)
            .spawn()?;
        Ok(())
    })();
    if let Err(e) = started {
        tracing::warn!("cannot start the background {kind:?} worker ({e}); continuing without it");
    }
}
