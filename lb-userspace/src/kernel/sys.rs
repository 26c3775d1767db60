//! The few `bpf(2)` commands aya 0.14 does not offer for cgroup links: open a pinned object,
//! read a link's target, replace a link's program in place (`BPF_LINK_UPDATE`), detach a
//! link, walk all links, and batch map writes.
//!
//! Every call passes a whole `union bpf_attr` (aya-obj's generated type) that starts zeroed
//! and has only its command's fields set: the kernel refuses an attribute whose bytes past the
//! command's last field are not zero (`CHECK_ATTR` in kernel/bpf/syscall.c), and a struct
//! written by hand for one member has padding whose bytes are whatever the stack held.

use std::{
    ffi::{CStr, CString},
    io,
    os::{
        fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::Path,
};

use aya_obj::generated::{bpf_attr, bpf_cmd, bpf_link_info, bpf_link_type};

/// An all-zero `union bpf_attr`.
fn zeroed() -> bpf_attr {
    // SAFETY: bpf_attr is plain integers, arrays and unions of them: all zero is valid.
    unsafe { std::mem::zeroed() }
}

/// Runs one bpf(2) command on `attr`.
fn bpf(cmd: bpf_cmd, attr: &mut bpf_attr) -> io::Result<i64> {
    let size = u32::try_from(size_of::<bpf_attr>())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: `attr` is a live, fully initialised `union bpf_attr` and `size` its length; the
    // kernel reads (and for info, writes) within it or through the user pointers it holds,
    // which point at live buffers of the stated lengths.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd as libc::c_long,
            std::ptr::from_mut(attr).cast::<libc::c_void>(),
            size,
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn owned_fd(ret: i64) -> io::Result<OwnedFd> {
    let fd = i32::try_from(ret).map_err(|_| io::Error::from(io::ErrorKind::InvalidData))?;
    // SAFETY: the kernel just returned this new descriptor to us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn raw(fd: BorrowedFd<'_>) -> u32 {
    u32::try_from(fd.as_raw_fd()).unwrap_or(u32::MAX)
}

/// The attribute of `BPF_OBJ_GET` for `path`.
fn obj_get_attr(path: &CStr) -> bpf_attr {
    let mut attr = zeroed();
    attr.__bindgen_anon_4.pathname = path.as_ptr() as u64;
    attr
}

/// `BPF_OBJ_GET`: opens a pinned map, program or link.
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let path = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let mut attr = obj_get_attr(&path);
    owned_fd(bpf(bpf_cmd::BPF_OBJ_GET, &mut attr)?)
}

/// `BPF_LINK_UPDATE`: the link runs `prog` from now on, atomically, with no moment where
/// neither program is attached.
pub fn link_update(link: BorrowedFd<'_>, prog: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = zeroed();
    attr.link_update.link_fd = raw(link);
    attr.link_update.__bindgen_anon_1.new_prog_fd = raw(prog);
    bpf(bpf_cmd::BPF_LINK_UPDATE, &mut attr).map(drop)
}

/// `BPF_LINK_DETACH`: detaches the link now, even while other descriptors or pins hold it.
pub fn link_detach(link: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = zeroed();
    attr.link_detach.link_fd = raw(link);
    bpf(bpf_cmd::BPF_LINK_DETACH, &mut attr).map(drop)
}

/// What a cgroup link is attached to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkInfo {
    pub id: u32,
    pub prog_id: u32,
    /// Whether it is a cgroup link; the fields below are meaningful only then.
    pub is_cgroup: bool,
    /// 0 when the cgroup was removed (the link is defunct).
    pub cgroup_id: u64,
    pub attach_type: u32,
}

/// `BPF_OBJ_GET_INFO_BY_FD` on a link.
pub fn link_info(link: BorrowedFd<'_>) -> io::Result<LinkInfo> {
    // SAFETY: bpf_link_info is plain integers and unions of them; all zero is valid.
    let mut info: bpf_link_info = unsafe { std::mem::zeroed() };
    let mut attr = zeroed();
    attr.info.bpf_fd = raw(link);
    attr.info.info_len = u32::try_from(size_of::<bpf_link_info>()).unwrap_or(0);
    attr.info.info = std::ptr::from_mut(&mut info) as u64;
    bpf(bpf_cmd::BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    let is_cgroup = info.type_ == bpf_link_type::BPF_LINK_TYPE_CGROUP as u32;
    // SAFETY: for a cgroup link the kernel filled the `cgroup` member of the union; for any
    // other type we do not read it.
    let (cgroup_id, attach_type) = if is_cgroup {
        let cgroup = unsafe { info.__bindgen_anon_1.cgroup };
        (cgroup.cgroup_id, cgroup.attach_type)
    } else {
        (0, 0)
    };
    Ok(LinkInfo {
        id: info.id,
        prog_id: info.prog_id,
        is_cgroup,
        cgroup_id,
        attach_type,
    })
}

/// Ids of all links in the system (`BPF_LINK_GET_NEXT_ID`).
pub fn link_ids() -> io::Result<Vec<u32>> {
    let mut ids = Vec::new();
    let mut start = 0;
    loop {
        let mut attr = zeroed();
        attr.__bindgen_anon_6.__bindgen_anon_1.start_id = start;
        match bpf(bpf_cmd::BPF_LINK_GET_NEXT_ID, &mut attr) {
            Ok(_) => {
                // SAFETY: the kernel wrote next_id, a plain integer, on success.
                let next = unsafe { attr.__bindgen_anon_6.next_id };
                ids.push(next);
                start = next;
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(ids),
            Err(e) => return Err(e),
        }
    }
}

/// `BPF_LINK_GET_FD_BY_ID`.
pub fn link_fd_by_id(id: u32) -> io::Result<OwnedFd> {
    let mut attr = zeroed();
    attr.__bindgen_anon_6.__bindgen_anon_1.link_id = id;
    owned_fd(bpf(bpf_cmd::BPF_LINK_GET_FD_BY_ID, &mut attr)?)
}

/// The cgroup id the kernel reports for a cgroup v2 directory: its inode number.
pub fn cgroup_id(dir: &Path) -> io::Result<u64> {
    use std::os::unix::fs::MetadataExt as _;
    Ok(std::fs::metadata(dir)?.ino())
}

/// A batch that stopped early: how many elements went through, and why it stopped.
#[derive(Debug)]
pub struct BatchError {
    pub done: usize,
    pub error: io::Error,
}

fn batch(
    cmd: bpf_cmd,
    map: BorrowedFd<'_>,
    keys: *const u8,
    values: *const u8,
    count: usize,
) -> Result<(), BatchError> {
    let count32 = u32::try_from(count).map_err(|_| BatchError {
        done: 0,
        error: io::Error::from(io::ErrorKind::InvalidInput),
    })?;
    let mut attr = zeroed();
    attr.batch.keys = keys as u64;
    attr.batch.values = values as u64;
    attr.batch.count = count32;
    attr.batch.map_fd = raw(map);
    match bpf(cmd, &mut attr) {
        Ok(_) => Ok(()),
        // The kernel reports in `count` how many elements it processed before the error.
        Err(error) => Err(BatchError {
            // SAFETY: `count` is a plain integer the kernel updated in place.
            done: usize::try_from(unsafe { attr.batch.count })
                .unwrap_or(0)
                .min(count),
            error,
        }),
    }
}

/// `BPF_MAP_UPDATE_BATCH`: `keys[i] -> values[i]`, in order, in one syscall.
pub fn map_update_batch<K: aya::Pod, V: aya::Pod>(
    map: BorrowedFd<'_>,
    keys: &[K],
    values: &[V],
) -> Result<(), BatchError> {
    if keys.len() != values.len() {
        return Err(BatchError {
            done: 0,
            error: io::Error::from(io::ErrorKind::InvalidInput),
        });
    }
    batch(
        bpf_cmd::BPF_MAP_UPDATE_BATCH,
        map,
        keys.as_ptr().cast(),
        values.as_ptr().cast(),
        keys.len(),
    )
}

/// `BPF_MAP_DELETE_BATCH`: deletes `keys`, in order, in one syscall (a missing key stops it
/// with ENOENT).
pub fn map_delete_batch<K: aya::Pod>(map: BorrowedFd<'_>, keys: &[K]) -> Result<(), BatchError> {
    batch(
        bpf_cmd::BPF_MAP_DELETE_BATCH,
        map,
        keys.as_ptr().cast(),
        std::ptr::null(),
        keys.len(),
    )
}

/// `BPF_MAP_UPDATE_ELEM` (`BPF_ANY`): `key -> value`.
pub fn map_update_elem<K: aya::Pod, V: aya::Pod>(
    map: BorrowedFd<'_>,
    key: &K,
    value: &V,
) -> io::Result<()> {
    let mut attr = zeroed();
    attr.__bindgen_anon_2.map_fd = raw(map);
    attr.__bindgen_anon_2.key = std::ptr::from_ref(key) as u64;
    attr.__bindgen_anon_2.__bindgen_anon_1.value = std::ptr::from_ref(value) as u64;
    bpf(bpf_cmd::BPF_MAP_UPDATE_ELEM, &mut attr).map(drop)
}

/// `BPF_MAP_DELETE_ELEM`: deletes `key` (ENOENT if it is not there).
pub fn map_delete_elem<K: aya::Pod>(map: BorrowedFd<'_>, key: &K) -> io::Result<()> {
    let mut attr = zeroed();
    attr.__bindgen_anon_2.map_fd = raw(map);
    attr.__bindgen_anon_2.key = std::ptr::from_ref(key) as u64;
    bpf(bpf_cmd::BPF_MAP_DELETE_ELEM, &mut attr).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fills a stretch of the stack with 0xff, so that a struct built next in a new frame
    /// finds those bytes in its padding unless it is zeroed.
    #[inline(never)]
    fn dirty_the_stack() -> u8 {
        let junk = std::hint::black_box([0xffu8; 4096]);
        junk[4095]
    }

    #[test]
    fn attributes_are_zero_past_their_fields() {
        assert_eq!(dirty_the_stack(), 0xff);
        let path = CString::new("/sys/fs/bpf/lb/x").unwrap();
        let attr = obj_get_attr(&path);
        // SAFETY: reading the union's bytes; every byte of it is initialised (zeroed).
        let bytes: &[u8; size_of::<bpf_attr>()] = unsafe { &*std::ptr::from_ref(&attr).cast() };
        // BPF_OBJ_GET uses pathname (8 bytes), bpf_fd, file_flags and path_fd (4 each): the
        // kernel requires every byte after path_fd to be zero.
        assert!(bytes[20..].iter().all(|&b| b == 0), "{bytes:?}");
        assert_eq!(
            u64::from_ne_bytes(bytes[..8].try_into().unwrap()),
            path.as_ptr() as u64
        );
    }
}
