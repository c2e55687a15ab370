//! Page cache for a file being decoded, made ready from a second core when
//! getting it is what holds the writer up.
//!
//! A buffered write first allocates a page-cache page, then copies into it.
//! Usually the copy dominates and a fetch is bound by decoding and hashing.
//! In a VM whose host takes back the memory the guest frees (virtio-balloon
//! free page reporting, common on cloud VMs), each fresh page traps to the
//! host on first touch, and one writer then waits for page allocation
//! longer than decoding takes, whatever the decoder does. The kernel lets
//! another thread allocate those pages concurrently: reading a hole of a
//! sparse file (`posix_fadvise(WILLNEED)`) puts zeroed pages in the cache
//! without the inode lock every buffered write takes. So a warmer thread
//! fills the cache from the file's end backwards while the writer goes
//! forwards, and each covers about half.
//!
//! Only when the writer is slow: where pages come cheap, zeroing them first
//! is pure extra work, so the warmer sleeps while the writer's last write ran
//! faster than [`SLOW_NS_PER_MIB`]. It runs at the lowest priority, so it
//! only takes CPU the decoding workers leave idle. Correctness never
//! depends on it: the kernel skips pages the writer has already filled, and
//! the writer overwrites any the warmer zeroed.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Files smaller than this are written before a warmer could help.
pub const MIN_LEN: u64 = 4 << 20;
const CHUNK: u64 = 1 << 20;
/// A write slower than this per MiB is waiting for page allocation: a plain
/// memory copy runs at several GB/s (well under this), while pages that trap
/// to a hypervisor on first touch take several times longer.
const SLOW_NS_PER_MIB: u64 = 1_000_000;
/// How often a sleeping warmer looks at the writer's pace again.
const POLL: Duration = Duration::from_micros(500);

/// What the writer tells the warmer: how far it has written, and how fast.
#[derive(Default)]
pub struct WritePace {
    written_end: AtomicU64,
    slow: AtomicBool,
    finished: AtomicBool,
}

impl WritePace {
    /// Called by the writer after each write of `len` bytes at `offset`.
    pub fn wrote(&self, offset: u64, len: usize, took: Duration) {
        self.written_end
            .fetch_max(offset + len as u64, Ordering::Relaxed);
        let per_mib = took.as_nanos() as u64 * (1 << 20) / (len.max(1) as u64);
        self.slow
            .store(per_mib > SLOW_NS_PER_MIB, Ordering::Relaxed);
    }

    /// Timed write through `write`, reported to the warmer.
    pub fn write<E>(
        &self,
        offset: u64,
        bytes: &[u8],
        write: impl FnOnce() -> Result<(), E>,
    ) -> Result<(), E> {
        let start = Instant::now();
        let written = write();
        self.wrote(offset, bytes.len(), start.elapsed());
        written
    }

    /// No more writes: the warmer stops.
    pub fn finish(&self) {
        self.finished.store(true, Ordering::Relaxed);
    }

    /// Calls [`WritePace::finish`] when dropped.
    pub fn finish_on_drop(&self) -> impl Drop + '_ {
        struct Finish<'a>(&'a WritePace);
        impl Drop for Finish<'_> {
            fn drop(&mut self) {
                self.0.finish();
            }
        }
        Finish(self)
    }
}

/// Fills the page cache for `file`, whose final length is `len`, from its
/// end backwards while the writer is slow, until it meets the writer or
/// `pace.finish()`. Failures only end the warming.
pub fn warm_from_end(file: &File, len: u64, pace: &WritePace) {
    // SAFETY: plain syscalls on this thread's own id.
    unsafe {
        libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, 19);
    }
    let mut sized = false;
    let mut end = len;
    while !pace.finished.load(Ordering::Relaxed) {
        let start = end.saturating_sub(CHUNK);
        if start <= pace.written_end.load(Ordering::Relaxed) + CHUNK {
            return;
        }
        if !pace.slow.load(Ordering::Relaxed) {
            std::thread::sleep(POLL);
            continue;
        }
        // Holes only exist below the end: the file gets its final length
        // (which decoding proves) the first time it is needed.
        if !sized {
            if file.set_len(len).is_err() {
                return;
            }
            sized = true;
        }
        // SAFETY: an advisory syscall on a descriptor `file` keeps open.
        let r = unsafe {
            libc::posix_fadvise(
                file.as_raw_fd(),
                start as libc::off_t,
                (end - start) as libc::off_t,
                libc::POSIX_FADV_WILLNEED,
            )
        };
        if r != 0 {
            return;
        }
        end = start;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    /// A new empty file, and 8 MiB without a zero byte to write into it.
    fn new_file() -> (tempfile::TempDir, std::path::PathBuf, File, Vec<u8>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out");
        let file = File::create(&path).unwrap();
        let data = (0..8u64 << 20).map(|i| (i * 7 % 251) as u8 + 1).collect();
        (dir, path, file, data)
    }

    #[test]
    fn pages_warmed_ahead_of_the_writer_are_overwritten() {
        let (_dir, path, file, data) = new_file();
        let len = data.len() as u64;
        let pace = WritePace::default();
        file.write_all_at(&data[..1 << 20], 0).unwrap();
        pace.wrote(0, 1 << 20, Duration::from_millis(5));
        // Returns once it has warmed everything down to the writer.
        warm_from_end(&file, len, &pace);
        assert_eq!(
            file.metadata().unwrap().len(),
            len,
            "the warmer sized the file"
        );
        file.write_all_at(&data[1 << 20..], 1 << 20).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), data);
    }

    #[test]
    fn warming_beside_the_writer_never_changes_what_it_wrote() {
        let (_dir, path, file, data) = new_file();
        let len = data.len() as u64;
        let pace = WritePace::default();
        std::thread::scope(|s| {
            s.spawn(|| warm_from_end(&file, len, &pace));
            for (i, piece) in data.chunks(1 << 20).enumerate() {
                let offset = (i as u64) << 20;
                // Every write reported as slow, so the warmer works throughout.
                file.write_all_at(piece, offset).unwrap();
                pace.wrote(offset, piece.len(), Duration::from_millis(5));
            }
            pace.finish();
        });
        assert_eq!(std::fs::read(&path).unwrap(), data);
    }

    #[test]
    fn a_fast_writer_leaves_the_warmer_idle() {
        let (_dir, _, file, _) = new_file();
        let pace = WritePace::default();
        pace.wrote(0, 1 << 20, Duration::from_micros(200));
        std::thread::scope(|s| {
            s.spawn(|| warm_from_end(&file, 16 << 20, &pace));
            std::thread::sleep(Duration::from_millis(5));
            pace.finish();
        });
        // Never slow: never sized, so nothing was warmed.
        assert_eq!(file.metadata().unwrap().len(), 0);
    }
}
