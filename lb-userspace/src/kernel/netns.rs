//! The network namespaces that lb's clients live in: those of the processes in the cgroup
//! subtree lb attaches to, and the agent's own.
//!
//! Sockets are per network namespace, and so is every way to reach them from outside
//! (`sock_diag` netlink, BPF socket iterators): to close a client's socket, lb must enter the
//! client's namespace. The cgroup is what lb knows about its clients; `/proc/PID/ns/net` of
//! each process in it names the namespace (nsfs: one inode per namespace).

use std::{
    collections::HashMap,
    fs::File,
    io,
    os::{fd::AsRawFd as _, unix::fs::MetadataExt as _},
    path::{Path, PathBuf},
};

/// An open network namespace (a `/proc/PID/ns/net` descriptor, which keeps the namespace
/// alive while it is held).
#[derive(Debug)]
pub struct Netns {
    /// The nsfs device and inode: the namespace's identity.
    pub id: (u64, u64),
    /// Where it was opened from (for logs).
    pub path: PathBuf,
    /// The processes of the cgroup subtree found in it (where its sockets' descriptors are).
    pub pids: Vec<u32>,
    file: File,
}

impl Netns {
    /// Opens the namespace at `path` (a `/proc/PID/ns/net` or a bind mount of one).
    pub fn open(path: &Path) -> io::Result<Self> {
        let file = File::open(path)?;
        let meta = file.metadata()?;
        Ok(Self {
            id: (meta.dev(), meta.ino()),
            path: path.to_owned(),
            pids: Vec::new(),
            file,
        })
    }

    /// The calling thread's own namespace.
    pub fn current_thread() -> io::Result<Self> {
        Self::open(Path::new("/proc/thread-self/ns/net"))
    }

    /// Moves the calling thread into this namespace (`setns(2)`). Only the calling thread
    /// moves; sockets it creates afterwards belong to this namespace for their whole life.
    pub fn enter(&self) -> io::Result<()> {
        // SAFETY: setns on a descriptor we hold open; it changes only this thread's namespace.
        if unsafe { libc::setns(self.file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

/// Every cgroup directory of the subtree at `root` (itself included). Directories that vanish
/// while walking are skipped.
fn cgroup_dirs(root: &Path) -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for entry in entries.flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push(entry.path());
                }
            }
        }
        dirs.push(dir);
    }
    dirs
}

/// The process ids listed in a `cgroup.procs` file's text.
pub fn parse_procs(text: &str) -> impl Iterator<Item = u32> + '_ {
    text.split_ascii_whitespace().filter_map(|p| p.parse().ok())
}

/// The distinct network namespaces of the processes in the cgroup subtree at `root`, plus
/// `extra` (the agent's own), each opened once and with the subtree's processes in it.
/// Processes that exit meanwhile are skipped.
pub fn in_cgroup_subtree(root: &Path, extra: impl IntoIterator<Item = Netns>) -> Vec<Netns> {
    let mut index: HashMap<(u64, u64), usize> = HashMap::new();
    let mut found: Vec<Netns> = Vec::new();
    for ns in extra {
        if let std::collections::hash_map::Entry::Vacant(slot) = index.entry(ns.id) {
            slot.insert(found.len());
            found.push(ns);
        }
    }
    for dir in cgroup_dirs(root) {
        let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) else {
            continue;
        };
        for pid in parse_procs(&procs) {
            let path = PathBuf::from(format!("/proc/{pid}/ns/net"));
            // stat first: most processes share a namespace already seen, and a stat is
            // cheaper than an open.
            let Ok(meta) = std::fs::metadata(&path) else {
                continue;
            };
            if let Some(&i) = index.get(&(meta.dev(), meta.ino())) {
                found[i].pids.push(pid);
                continue;
            }
            // The descriptor's identity is what counts (the pid may have been reused).
            let Ok(mut ns) = Netns::open(&path) else {
                continue;
            };
            if let Some(&i) = index.get(&ns.id) {
                found[i].pids.push(pid);
            } else {
                ns.pids.push(pid);
                index.insert(ns.id, found.len());
                found.push(ns);
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn procs_are_one_pid_per_line() {
        assert_eq!(
            parse_procs("1\n22\n333\n").collect::<Vec<_>>(),
            [1, 22, 333]
        );
        assert_eq!(parse_procs("").count(), 0);
        assert_eq!(parse_procs("7\nnot-a-pid\n").collect::<Vec<_>>(), [7]);
    }

    #[test]
    fn own_namespace_is_found_once() {
        let Ok(own) = Netns::current_thread() else {
            return; // no /proc (not Linux): nothing to check
        };
        let again = Netns::current_thread().expect("second open");
        assert_eq!(own.id, again.id);
        let dir = std::env::temp_dir().join(format!("lb-netns-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::write(
            dir.join("cgroup.procs"),
            format!("{}\n", std::process::id()),
        )
        .expect("write procs");
        let found = in_cgroup_subtree(&dir, [own, again]);
        let _gone = std::fs::remove_dir_all(&dir);
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].pids, [std::process::id()]);
    }
}
