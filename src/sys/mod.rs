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
