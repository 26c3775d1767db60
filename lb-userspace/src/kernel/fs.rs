//! The two file systems lb lives on: bpffs (pins) and cgroup v2 (where programs attach).

use std::{
    ffi::CString,
    io,
    os::unix::ffi::OsStrExt as _,
    path::{Path, PathBuf},
};

/// `BPF_FS_MAGIC` from linux/magic.h.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
/// `CGROUP2_SUPER_MAGIC` from linux/magic.h.
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
/// Where bpffs is conventionally mounted.
pub const BPFFS_ROOT: &str = "/sys/fs/bpf";

#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "{path} is not on a bpffs; mount one there (mount -t bpf bpf DIR) or use a --pin-path under {BPFFS_ROOT}"
    )]
    NotBpffs { path: PathBuf },
    #[error("{path} is not a cgroup v2 directory")]
    NotCgroup2 { path: PathBuf },
    #[error(
        "no cgroup2 file system is mounted (read /proc/self/mounts); mount one or pass --cgroup"
    )]
    NoCgroup2,
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> FsError + '_ {
    move |source| FsError::Io {
        path: path.to_owned(),
        source,
    }
}

fn fs_magic(path: &Path) -> io::Result<i64> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: statfs is plain integers; zeroed is a valid value for the kernel to overwrite.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a NUL-terminated path and `st` a live statfs buffer.
    if unsafe { libc::statfs(c.as_ptr(), &raw mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st.f_type)
}

/// The closest existing ancestor of `path` (itself included).
fn existing_ancestor(path: &Path) -> &Path {
    path.ancestors()
        .find(|p| p.exists())
        .unwrap_or_else(|| Path::new("/"))
}

/// Makes sure `pin_path` can be created on a bpffs: mounts bpffs at /sys/fs/bpf when the pin
/// path is under it and nothing is mounted there yet, as kube-proxy's and Cilium's node
/// agents do.
pub fn ensure_bpffs(pin_path: &Path) -> Result<(), FsError> {
    let anchor = existing_ancestor(pin_path);
    if fs_magic(anchor).map_err(io_err(anchor))? == BPF_FS_MAGIC {
        return Ok(());
    }
    let root = Path::new(BPFFS_ROOT);
    if !pin_path.starts_with(root) {
        return Err(FsError::NotBpffs {
            path: pin_path.to_owned(),
        });
    }
    std::fs::create_dir_all(root).map_err(io_err(root))?;
    if fs_magic(root).map_err(io_err(root))? != BPF_FS_MAGIC {
        mount_bpffs(root)?;
        tracing::info!(path = BPFFS_ROOT, "mounted bpffs");
    }
    if fs_magic(existing_ancestor(pin_path)).map_err(io_err(pin_path))? == BPF_FS_MAGIC {
        Ok(())
    } else {
        Err(FsError::NotBpffs {
            path: pin_path.to_owned(),
        })
    }
}

/// Mounts a bpffs at `dir` (created if missing) unless one is already there: the DaemonSet's
/// init container (`lb mount-bpffs`), so that the image needs no shell or `mount` binary.
/// Returns whether it mounted one.
pub fn mount_bpffs_if_missing(dir: &Path) -> Result<bool, FsError> {
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    if fs_magic(dir).map_err(io_err(dir))? == BPF_FS_MAGIC {
        return Ok(false);
    }
    mount_bpffs(dir)?;
    Ok(true)
}

fn mount_bpffs(at: &Path) -> Result<(), FsError> {
    let target = CString::new(at.as_os_str().as_bytes()).map_err(|_| FsError::NotBpffs {
        path: at.to_owned(),
    })?;
    // SAFETY: NUL-terminated strings that outlive the call; no data argument.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            target.as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(FsError::Io {
            path: at.to_owned(),
            source: io::Error::last_os_error(),
        })
    }
}

/// The first cgroup2 mount in /proc/self/mounts (not always /sys/fs/cgroup: hybrid hosts
/// have it at /sys/fs/cgroup/unified).
pub fn cgroup2_root() -> Result<PathBuf, FsError> {
    let mounts = Path::new("/proc/self/mounts");
    let text = std::fs::read_to_string(mounts).map_err(io_err(mounts))?;
    cgroup2_root_in(&text).ok_or(FsError::NoCgroup2)
}

fn cgroup2_root_in(mounts: &str) -> Option<PathBuf> {
    mounts.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let (_dev, dir, fstype) = (fields.next()?, fields.next()?, fields.next()?);
        (fstype == "cgroup2").then(|| PathBuf::from(unescape_mount_path(dir)))
    })
}

/// /proc/mounts escapes space, tab, newline and backslash as octal.
fn unescape_mount_path(s: &str) -> String {
    s.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

/// Checks that `dir` is a cgroup v2 directory.
pub fn check_cgroup2(dir: &Path) -> Result<(), FsError> {
    if fs_magic(dir).map_err(io_err(dir))? == CGROUP2_SUPER_MAGIC {
        Ok(())
    } else {
        Err(FsError::NotCgroup2 {
            path: dir.to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_on_hybrid_hosts() {
        let mounts = "tmpfs /sys/fs/cgroup tmpfs rw 0 0\ncgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\ncgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n";
        assert_eq!(
            cgroup2_root_in(mounts),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(
            cgroup2_root_in("cgroup2 /sys/fs/cgroup cgroup2 rw 0 0"),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
        assert_eq!(cgroup2_root_in("proc /proc proc rw 0 0"), None);
        assert_eq!(
            cgroup2_root_in("cgroup2 /a\\040b cgroup2 rw 0 0"),
            Some(PathBuf::from("/a b"))
        );
    }
}
