//! Where walvault talks to the operating system below std: every `unsafe`
//! block of the program lives in this module (and the local store driver),
//! each with a SAFETY comment, behind safe functions.

pub mod atomic;
pub mod warm;

pub use atomic::{
    Durability, remove_abandoned_temporaries, write_atomically_with, write_bytes,
    write_file_atomically,
};

/// Whether a process `pid` exists (one we may not signal exists too).
pub fn process_exists(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    if pid <= 0 {
        // kill(0 or negative) would address process groups.
        return true;
    }
    // SAFETY: signal 0 only checks that the process exists.
    let sent = unsafe { libc::kill(pid, 0) };
    sent == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

/// The effective user id of this process.
pub fn effective_uid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// The name of OS user `uid`, if the user database knows it.
pub fn user_name(uid: u32) -> Option<String> {
    // SAFETY: getpwuid_r writes only into `pwd` and `buf`, both owned here
    // and alive while the name is copied out of them.
    unsafe {
        let mut pwd: libc::passwd = std::mem::zeroed();
        let mut buf = vec![0 as libc::c_char; 16384];
        let mut found: *mut libc::passwd = std::ptr::null_mut();
        let rc = libc::getpwuid_r(uid, &mut pwd, buf.as_mut_ptr(), buf.len(), &mut found);
        if rc != 0 || found.is_null() || pwd.pw_name.is_null() {
            return None;
        }
        Some(
            std::ffi::CStr::from_ptr(pwd.pw_name)
                .to_string_lossy()
                .into_owned(),
        )
    }
}

/// Sets the process's file creation mask. Process-wide: call it before any
/// thread starts.
pub fn set_umask(mask: u32) {
    // SAFETY: umask only swaps the process's file creation mask.
    unsafe { libc::umask(mask as libc::mode_t) };
}

fn c_path(path: &std::path::Path) -> std::io::Result<std::ffi::CString> {
    use std::os::unix::ffi::OsStrExt;
    std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::other("path holds a NUL byte"))
}

/// The filesystem type (statfs `f_type` magic) `path` lies on.
pub fn filesystem_type(path: &std::path::Path) -> std::io::Result<i64> {
    let c = c_path(path)?;
    let mut fs = std::mem::MaybeUninit::<libc::statfs>::uninit();
    // SAFETY: statfs writes a struct statfs into `fs`, which is read only
    // after it returned 0; `c` is a valid C string that outlives the call.
    if unsafe { libc::statfs(c.as_ptr(), fs.as_mut_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: statfs returned 0, so it filled `fs`.
    #[allow(clippy::unnecessary_cast)] // f_type's type differs between platforms
    Ok(unsafe { fs.assume_init() }.f_type as i64)
}

/// Bytes an unprivileged user may still write on the filesystem of `path`.
pub fn free_bytes(path: &std::path::Path) -> std::io::Result<u64> {
    let c = c_path(path)?;
    let mut s = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `c` is a NUL-terminated path; statvfs writes a struct statvfs
    // into `s`, which is read only if it succeeded.
    if unsafe { libc::statvfs(c.as_ptr(), s.as_mut_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: statvfs returned 0, so it filled `s`.
    let s = unsafe { s.assume_init() };
    Ok(s.f_bavail.saturating_mul(s.f_frsize))
}

/// Creates a new directory named `prefix` plus six random characters, mode
/// 0700, the way mkdtemp(3) does: never one that existed before, nor a link.
pub fn make_temporary_dir(prefix: &std::path::Path) -> std::io::Result<std::path::PathBuf> {
    use std::os::unix::ffi::{OsStrExt, OsStringExt};
    let mut template = prefix.as_os_str().to_owned().into_vec();
    template.extend_from_slice(b"XXXXXX\0");
    // SAFETY: `template` is a NUL-terminated buffer mkdtemp fills in place.
    let made = unsafe { libc::mkdtemp(template.as_mut_ptr().cast()) };
    if made.is_null() {
        return Err(std::io::Error::last_os_error());
    }
    template.pop();
    Ok(std::path::PathBuf::from(std::ffi::OsStr::from_bytes(
        &template,
    )))
}

/// Makes everything written on the filesystem holding `file` durable: one
/// call per filesystem, far cheaper than an fsync per file.
pub fn syncfs(file: &std::fs::File) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: syncfs only reads the descriptor, which `file` keeps open.
    if unsafe { libc::syncfs(file.as_raw_fd()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Turns O_DIRECT off for the rest of `file`'s writes.
pub fn clear_direct_io(file: &std::fs::File) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let fd = file.as_raw_fd();
    // SAFETY: fcntl on a descriptor `file` owns; no memory is passed.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: as above.
    if flags == -1 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_DIRECT) } == -1 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Asks the kernel to start writing back a range of `file` now, so a later
/// fsync finds less to do. Advice only: its result is ignored.
pub fn start_writeback(file: &std::fs::File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd;
    // SAFETY: only asks the kernel to start writing back a range of a file
    // we hold open; no memory is passed.
    unsafe {
        libc::sync_file_range(
            file.as_raw_fd(),
            offset as i64,
            len as i64,
            libc::SYNC_FILE_RANGE_WRITE,
        )
    };
}

/// Reads the next piece (at most `max` bytes) of `file` onto the end of
/// `buf`, straight into its spare room: zeroing it first would cost a pass
/// over every byte. Returns how many bytes came, 0 at the end of the file.
pub fn read_appending(
    file: &mut std::fs::File,
    buf: &mut bytes::BytesMut,
    max: usize,
) -> std::io::Result<usize> {
    use std::os::fd::AsRawFd;
    loop {
        let spare = buf.spare_capacity_mut();
        let room = spare.len().min(max);
        // SAFETY: read(2) writes at most `room` bytes into the spare
        // capacity `spare` points at, which `buf` owns; no reference to the
        // uninitialized bytes is made.
        let n = unsafe { libc::read(file.as_raw_fd(), spare.as_mut_ptr().cast(), room) };
        if n >= 0 {
            // SAFETY: the kernel initialized the first `n` spare bytes.
            unsafe { buf.set_len(buf.len() + n as usize) };
            return Ok(n as usize);
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Makes `command`'s process run at `nice` (higher is lower priority).
pub fn run_at_nice(command: &mut std::process::Command, nice: i32) {
    use std::os::unix::process::CommandExt;
    // SAFETY: between fork and exec this only calls setpriority(2), which
    // is async-signal-safe and touches no memory.
    unsafe {
        command.pre_exec(move || {
            libc::setpriority(libc::PRIO_PROCESS, 0, nice);
            Ok(())
        });
    }
}
