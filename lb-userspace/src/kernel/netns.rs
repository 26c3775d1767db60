//! The network namespaces that lb's clients live in: those of the processes in the cgroup
//! subtree lb attaches to, and the agent's own.
//!
//! Sockets are per network namespace, and so is every way to reach them from outside
//! (`sock_diag` netlink, BPF socket iterators): to close a client's socket, lb must enter the
//! client's namespace. The cgroup is what lb knows about its clients; `/proc/PID/ns/net` of
//! each process in it names the namespace (nsfs: one inode per namespace).

use std::{
    collections::{HashMap, HashSet},
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

/// The namespace's cookie, as `bpf_get_netns_cookie()` gives it to the programs (the key of
/// `LB_AFFINITY`): `SO_NETNS_COOKIE` of a socket made inside it. Runs on a thread of its own,
/// so the caller's namespace never changes.
pub fn cookie(ns: &Netns) -> io::Result<u64> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                ns.enter()?;
                own_cookie()
            })
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("namespace thread panicked")))
    })
}

/// `SO_NETNS_COOKIE` of a socket in the calling thread's namespace.
fn own_cookie() -> io::Result<u64> {
    // SAFETY: plain socket(2); the descriptor is owned below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new descriptor nothing else owns.
    let sock = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let mut cookie: u64 = 0;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes into `cookie`.
    let ret = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &raw mut len,
        )
    };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

/// The interface addresses of the calling thread's namespace.
fn own_addresses() -> io::Result<Vec<std::net::IpAddr>> {
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs allocates the list; it is freed below.
    if unsafe { libc::getifaddrs(&raw mut list) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut cur = list;
    while !cur.is_null() {
        // SAFETY: a node of the list getifaddrs returned, alive until freeifaddrs.
        let node = unsafe { &*cur };
        if !node.ifa_addr.is_null() {
            // SAFETY: ifa_addr points at a sockaddr of the family it states.
            let family = i32::from(unsafe { (*node.ifa_addr).sa_family });
            if family == libc::AF_INET {
                // SAFETY: an AF_INET sockaddr is a sockaddr_in.
                let sin = unsafe { &*node.ifa_addr.cast::<libc::sockaddr_in>() };
                out.push(std::net::IpAddr::from(sin.sin_addr.s_addr.to_ne_bytes()));
            } else if family == libc::AF_INET6 {
                // SAFETY: an AF_INET6 sockaddr is a sockaddr_in6.
                let sin6 = unsafe { &*node.ifa_addr.cast::<libc::sockaddr_in6>() };
                out.push(std::net::IpAddr::from(sin6.sin6_addr.s6_addr));
            }
        }
        cur = node.ifa_next;
    }
    // SAFETY: the list getifaddrs allocated, freed once.
    unsafe { libc::freeifaddrs(list) };
    Ok(out)
}

/// A network namespace on this node whose interfaces hold an address: where it was found
/// and its cookie.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Found {
    pub path: PathBuf,
    pub cookie: u64,
}

/// The network namespaces on this node with `ip` on one of their interfaces: every process's
/// (`/proc/PID/ns/net`) and every named one (`/run/netns/*`, which may hold no process),
/// each looked at once. Namespaces this process may not enter are skipped.
pub fn with_address(ip: std::net::IpAddr) -> Vec<Found> {
    let candidates = on_node([]);
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let mut found = Vec::new();
                for ns in &candidates {
                    if ns.enter().is_err() {
                        continue;
                    }
                    if own_addresses().is_ok_and(|a| a.contains(&ip))
                        && let Ok(cookie) = own_cookie()
                    {
                        found.push(Found {
                            path: ns.path.clone(),
                            cookie,
                        });
                    }
                }
                found
            })
            .join()
            .unwrap_or_default()
    })
}

/// Every network namespace on this node that this process can open: `extra` (the agent's
/// own), every named one (`/run/netns/*`, which may hold no process) and every process's
/// (`/proc/PID/ns/net`), each opened once (deduplicated by nsfs identity) and with the
/// processes found in it. A socket lives in the namespace it was created in, whoever holds
/// it and wherever that process is now (a process may `setns` back and forth), so a walk
/// over sockets that must not miss one walks all of them.
pub fn on_node(extra: impl IntoIterator<Item = Netns>) -> Vec<Netns> {
    let mut index: HashMap<(u64, u64), usize> = HashMap::new();
    let mut found: Vec<Netns> = Vec::new();
    let named = std::fs::read_dir("/run/netns")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| Netns::open(&e.path()).ok());
    for ns in extra.into_iter().chain(named) {
        if let std::collections::hash_map::Entry::Vacant(slot) = index.entry(ns.id) {
            slot.insert(found.len());
            found.push(ns);
        }
    }
    let pids = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok());
    for pid in pids {
        add_process(&mut index, &mut found, pid);
    }
    found
}

/// Adds process `pid` to the namespace it is in, opening that namespace if new.
fn add_process(index: &mut HashMap<(u64, u64), usize>, found: &mut Vec<Netns>, pid: u32) {
    let path = PathBuf::from(format!("/proc/{pid}/ns/net"));
    // stat first: most processes share a namespace already seen, and a stat is cheaper than
    // an open.
    let Ok(meta) = std::fs::metadata(&path) else {
        return;
    };
    if let Some(&i) = index.get(&(meta.dev(), meta.ino())) {
        found[i].pids.push(pid);
        return;
    }
    // The descriptor's identity is what counts (the pid may have been reused).
    let Ok(mut ns) = Netns::open(&path) else {
        return;
    };
    if let Some(&i) = index.get(&ns.id) {
        found[i].pids.push(pid);
    } else {
        ns.pids.push(pid);
        index.insert(ns.id, found.len());
        found.push(ns);
    }
}

/// The cgroup v2 ids (directory inodes, as `bpf_get_current_cgroup_id()` and
/// `INET_DIAG_CGROUP_ID` give them) of every cgroup of the subtree at `root`, itself
/// included.
pub fn cgroup_ids(root: &Path) -> HashSet<u64> {
    cgroup_dirs(root)
        .iter()
        .filter_map(|dir| std::fs::metadata(dir).ok())
        .map(|meta| meta.ino())
        .collect()
}

/// The root of the cgroup v2 hierarchy that `cgroup` is in: its highest ancestor on the
/// same file system.
pub fn cgroup_hierarchy_root(cgroup: &Path) -> PathBuf {
    let mut root = cgroup.to_owned();
    let Ok(dev) = std::fs::metadata(cgroup).map(|m| m.dev()) else {
        return root;
    };
    while let Some(parent) = root.parent() {
        if std::fs::metadata(parent).map(|m| m.dev()).ok() != Some(dev) {
            break;
        }
        root = parent.to_owned();
    }
    root
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
            add_process(&mut index, &mut found, pid);
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

    #[test]
    fn every_namespace_on_the_node_is_found_once_with_its_processes() {
        let Ok(own) = Netns::current_thread() else {
            return; // no /proc (not Linux): nothing to check
        };
        let id = own.id;
        let found = on_node([own]);
        assert_eq!(found[0].id, id, "extra comes first");
        let mut ids: Vec<_> = found.iter().map(|ns| ns.id).collect();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), found.len(), "each namespace once");
        assert!(
            found
                .iter()
                .any(|ns| ns.id == id && ns.pids.contains(&std::process::id())),
            "this process, in its own namespace"
        );
    }

    #[test]
    fn cgroup_ids_are_directory_inodes() {
        let dir = std::env::temp_dir().join(format!("lb-cgroup-ids-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("a/b")).expect("mkdir");
        let ids = cgroup_ids(&dir);
        let ino = |p: &Path| std::fs::metadata(p).expect("stat").ino();
        let want: HashSet<u64> = [ino(&dir), ino(&dir.join("a")), ino(&dir.join("a/b"))].into();
        assert!(cgroup_hierarchy_root(&dir.join("a/b")).exists());
        let _gone = std::fs::remove_dir_all(&dir);
        assert_eq!(ids, want);
    }
}
