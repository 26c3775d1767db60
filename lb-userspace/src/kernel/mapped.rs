//! A read-only mapping of a `BPF_F_MMAPABLE` array map's values (`mmap(2)` of the map's file
//! descriptor, kernel 5.5): reading every element costs memory loads, not a syscall each.

use std::{
    io,
    os::fd::{AsFd as _, AsRawFd as _},
    ptr::NonNull,
};

use aya::maps::MapData;

/// The values of an array of `u64`, mapped read-only; unmapped on drop. The programs keep
/// writing the map: each read is one aligned 64-bit load, a value as it is at that moment.
pub struct MappedU64s {
    base: NonNull<u64>,
    len: usize,
    bytes: usize,
}

// SAFETY: the mapping is plain shared memory that this type only reads, with volatile loads.
unsafe impl Send for MappedU64s {}
// SAFETY: as above; reads from several threads are independent loads.
unsafe impl Sync for MappedU64s {}

impl MappedU64s {
    /// Maps the `len` values of `map`, an array of `u64` created with `BPF_F_MMAPABLE`.
    ///
    /// # Errors
    /// The `mmap` error (EINVAL for a map without the flag).
    pub fn new(map: &MapData, len: u32) -> io::Result<Self> {
        let len = len as usize;
        // SAFETY: sysconf has no preconditions.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) })
            .map_err(|_| io::Error::other("page size"))?;
        let bytes = (len * size_of::<u64>()).div_ceil(page) * page;
        // SAFETY: a fresh shared read-only mapping of the map's values; the kernel checks the
        // length against the map and keeps the map alive while it is mapped.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ,
                libc::MAP_SHARED,
                map.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let base = NonNull::new(addr.cast::<u64>()).ok_or_else(|| io::Error::other("mmap"))?;
        Ok(Self { base, len, bytes })
    }

    /// How many values are not 0.
    pub fn count_nonzero(&self) -> usize {
        (0..self.len)
            // SAFETY: `i < len`, inside the mapping; page-aligned base, so each u64 is aligned.
            .filter(|&i| unsafe { self.base.as_ptr().add(i).read_volatile() } != 0)
            .count()
    }
}

impl Drop for MappedU64s {
    fn drop(&mut self) {
        // SAFETY: the mapping this value made, of `bytes` bytes, unmapped once.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.bytes) };
    }
}
