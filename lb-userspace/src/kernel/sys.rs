//! The few `bpf(2)` commands aya 0.14 does not offer for cgroup links: open a pinned object,
//! read a link's target, replace a link's program in place (`BPF_LINK_UPDATE`), detach a
//! link, and walk all links. Each attr struct is the kernel's `union bpf_attr` member for its
//! command (a stable UAPI); the kernel accepts a prefix of the union when the rest is zero.

use std::{
    ffi::CString,
    io,
    os::{
        fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::Path,
};

use aya_obj::generated::{bpf_cmd, bpf_link_info, bpf_link_type};

/// Runs one bpf(2) command on `attr`.
fn bpf<T>(cmd: bpf_cmd, attr: &mut T) -> io::Result<i64> {
    let size =
        u32::try_from(size_of::<T>()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: `attr` is a live, initialised #[repr(C)] prefix of `union bpf_attr` for `cmd`
    // and `size` is its exact length; the kernel reads (and for info, writes) within it or
    // through the user pointers it holds, which point at live buffers of the stated lengths.
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

#[repr(C)]
struct ObjGetAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
    path_fd: i32,
}

/// `BPF_OBJ_GET`: opens a pinned map, program or link.
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let path = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let mut attr = ObjGetAttr {
        pathname: path.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
        path_fd: 0,
    };
    owned_fd(bpf(bpf_cmd::BPF_OBJ_GET, &mut attr)?)
}

#[repr(C)]
struct LinkUpdateAttr {
    link_fd: u32,
    new_prog_fd: u32,
    flags: u32,
    old_prog_fd: u32,
}

/// `BPF_LINK_UPDATE`: the link runs `prog` from now on, atomically, with no moment where
/// neither program is attached.
pub fn link_update(link: BorrowedFd<'_>, prog: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = LinkUpdateAttr {
        link_fd: raw(link),
        new_prog_fd: raw(prog),
        flags: 0,
        old_prog_fd: 0,
    };
    bpf(bpf_cmd::BPF_LINK_UPDATE, &mut attr).map(drop)
}

#[repr(C)]
struct LinkDetachAttr {
    link_fd: u32,
}

/// `BPF_LINK_DETACH`: detaches the link now, even while other descriptors or pins hold it.
pub fn link_detach(link: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = LinkDetachAttr { link_fd: raw(link) };
    bpf(bpf_cmd::BPF_LINK_DETACH, &mut attr).map(drop)
}

#[repr(C)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
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
    let mut attr = InfoAttr {
        bpf_fd: raw(link),
        info_len: u32::try_from(size_of::<bpf_link_info>()).unwrap_or(0),
        info: std::ptr::from_mut(&mut info) as u64,
    };
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

#[repr(C)]
struct GetIdAttr {
    id: u32,
    next_id: u32,
    open_flags: u32,
}

/// Ids of all links in the system (`BPF_LINK_GET_NEXT_ID`).
pub fn link_ids() -> io::Result<Vec<u32>> {
    let mut ids = Vec::new();
    let mut attr = GetIdAttr {
        id: 0,
        next_id: 0,
        open_flags: 0,
    };
    loop {
        match bpf(bpf_cmd::BPF_LINK_GET_NEXT_ID, &mut attr) {
            Ok(_) => {
                ids.push(attr.next_id);
                attr.id = attr.next_id;
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(ids),
            Err(e) => return Err(e),
        }
    }
}

/// `BPF_LINK_GET_FD_BY_ID`.
pub fn link_fd_by_id(id: u32) -> io::Result<OwnedFd> {
    let mut attr = GetIdAttr {
        id,
        next_id: 0,
        open_flags: 0,
    };
    owned_fd(bpf(bpf_cmd::BPF_LINK_GET_FD_BY_ID, &mut attr)?)
}

/// The cgroup id the kernel reports for a cgroup v2 directory: its inode number.
pub fn cgroup_id(dir: &Path) -> io::Result<u64> {
    use std::os::unix::fs::MetadataExt as _;
    Ok(std::fs::metadata(dir)?.ino())
}

#[repr(C)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
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
    let mut attr = BatchAttr {
        in_batch: 0,
        out_batch: 0,
        keys: keys as u64,
        values: values as u64,
        count: count32,
        map_fd: raw(map),
        elem_flags: 0,
        flags: 0,
    };
    match bpf(cmd, &mut attr) {
        Ok(_) => Ok(()),
        // The kernel reports in `count` how many elements it processed before the error.
        Err(error) => Err(BatchError {
            done: usize::try_from(attr.count).unwrap_or(0).min(count),
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
