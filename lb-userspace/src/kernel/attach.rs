//! Attaching the socket programs to the cgroup through pinned bpf_links, adopting the links
//! a previous agent left, and removing everything again (`lb cleanup`).

use std::{
    fs::File,
    io,
    os::fd::AsFd as _,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf,
    programs::{
        CgroupAttachMode, CgroupSock, CgroupSockAddr, Program, ProgramError, links::FdLink,
    },
};
use aya_obj::{
    generated::bpf_attach_type,
    programs::{CgroupSockAddrAttachType, CgroupSockAttachType},
};

use lb_common::programs;

use super::{PinLayout, sys};

/// A program and the hook it serves.
#[derive(Clone, Copy, Debug)]
pub struct Hook {
    pub program: &'static str,
    pub attach: HookAttach,
}

/// The cgroup hook of a program, by its program type.
#[derive(Clone, Copy, Debug)]
pub enum HookAttach {
    /// `BPF_PROG_TYPE_CGROUP_SOCK_ADDR`: connect, sendmsg, recvmsg, getpeername.
    SockAddr(CgroupSockAddrAttachType),
    /// `BPF_PROG_TYPE_CGROUP_SOCK`: socket creation and release.
    Sock(CgroupSockAttachType),
}

/// Every program lb attaches to the cgroup, by its name (lb-common's `programs`), in the
/// order the links are attached or taken over. The release hook first: from the moment a
/// connect or sendmsg program can claim a socket's `LB_TCP_SOCKS` or `LB_UDP_SOCKS` slot, the
/// hook that frees it is attached (an upgrade from layout 4 attaches it new). Then the readers (recvmsg,
/// getpeername), then the writers (connect, sendmsg): during an upgrade's takeover the new
/// readers, which read a socket's slot and then its storage, already run when the first new
/// writer puts a socket's state in a slot, which the old readers would not see.
pub const HOOKS: [Hook; 9] = [
    Hook {
        program: programs::SOCK_RELEASE,
        attach: HookAttach::Sock(CgroupSockAttachType::SockRelease),
    },
    Hook {
        program: programs::RECVMSG4,
        attach: HookAttach::SockAddr(CgroupSockAddrAttachType::UDPRecvMsg4),
    },
    Hook {
        program: programs::RECVMSG6,
        attach: HookAttach::SockAddr(CgroupSockAddrAttachType::UDPRecvMsg6),
    },
    Hook {
        program: programs::GETPEERNAME4,
        attach: HookAttach::SockAddr(CgroupSockAddrAttachType::GetPeerName4),
    },
    Hook {
        program: programs::GETPEERNAME6,
        attach: HookAttach::SockAddr(CgroupSockAddrAttachType::GetPeerName6),
    },
    Hook {
        program: programs::CONNECT4,
        attach: HookAttach::SockAddr(CgroupSockAddrAttachType::Connect4),
    },
    Hook {
        program: programs::CONNECT6,
        attach: HookAttach::SockAddr(CgroupSockAddrAttachType::Connect6),
    },
    Hook {
        program: programs::SENDMSG4,
        attach: HookAttach::SockAddr(CgroupSockAddrAttachType::UDPSendMsg4),
    },
    Hook {
        program: programs::SENDMSG6,
        attach: HookAttach::SockAddr(CgroupSockAddrAttachType::UDPSendMsg6),
    },
];

/// The prefix of every lb program name, for finding lb's links on a cgroup.
const PROGRAM_PREFIX: &str = programs::PREFIX;

#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("the eBPF object has no program {0} (build bug)")]
    MissingProgram(&'static str),
    #[error("program {program}")]
    Program {
        program: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("opening cgroup {path}")]
    Cgroup {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "pinned link {path} is not lb's {program} link on cgroup {cgroup} (it is {found}). \
         Run `lb cleanup --pin-path {pin}` first, or start lb with the --cgroup it was started with"
    )]
    Foreign {
        path: PathBuf,
        program: &'static str,
        cgroup: PathBuf,
        found: String,
        pin: PathBuf,
    },
}

/// What happened to one hook.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attachment {
    /// Attached now and pinned.
    Attached,
    /// A pinned link existed; its program was replaced by this agent's.
    Adopted,
}

fn kernel_attach_type(hook: &Hook) -> u32 {
    match hook.attach {
        HookAttach::SockAddr(attach) => bpf_attach_type::from(attach) as u32,
        HookAttach::Sock(attach) => bpf_attach_type::from(attach) as u32,
    }
}

/// Loads `hook`'s program as its program type.
fn load(program: &mut Program, hook: &Hook) -> Result<(), ProgramError> {
    match hook.attach {
        HookAttach::SockAddr(_) => <&mut CgroupSockAddr>::try_from(program)?.load(),
        HookAttach::Sock(_) => <&mut CgroupSock>::try_from(program)?.load(),
    }
}

/// Attaches `hook`'s loaded program to `cgroup` with a bpf_link (to be pinned at
/// `link_path`); the link.
fn attach_link(
    program: &mut Program,
    hook: &Hook,
    cgroup: &File,
    link_path: &Path,
) -> Result<FdLink, AttachError> {
    let program_error = |source| AttachError::Program {
        program: hook.program,
        source,
    };
    let link_error = |e: aya::programs::links::LinkError| AttachError::Io {
        what: "converting link",
        path: link_path.to_owned(),
        source: io::Error::other(e),
    };
    // A cgroup bpf_link always runs beside other programs of the cgroup (the kernel attaches
    // links as BPF_F_ALLOW_MULTI) and takes no flags: `Single` passes none.
    match hook.attach {
        HookAttach::SockAddr(_) => {
            let program = <&mut CgroupSockAddr>::try_from(program).map_err(program_error)?;
            let id = program
                .attach(cgroup, CgroupAttachMode::Single)
                .map_err(program_error)?;
            let link = program.take_link(id).map_err(program_error)?;
            link.try_into().map_err(link_error)
        }
        HookAttach::Sock(_) => {
            let program = <&mut CgroupSock>::try_from(program).map_err(program_error)?;
            let id = program
                .attach(cgroup, CgroupAttachMode::Single)
                .map_err(program_error)?;
            let link = program.take_link(id).map_err(program_error)?;
            link.try_into().map_err(link_error)
        }
    }
}

/// Loads every program and attaches it to `cgroup`, or adopts the pinned link a previous
/// agent left (swapping in the new program: no detach, no second attachment).
pub fn attach_or_adopt(
    ebpf: &mut Ebpf,
    layout: &PinLayout,
    cgroup: &Path,
) -> Result<Vec<(Hook, Attachment)>, AttachError> {
    let cgroup_file = File::open(cgroup).map_err(|source| AttachError::Cgroup {
        path: cgroup.to_owned(),
        source,
    })?;
    let cgroup_id = sys::cgroup_id(cgroup).map_err(|source| AttachError::Cgroup {
        path: cgroup.to_owned(),
        source,
    })?;
    let links_dir = layout.links_dir();
    std::fs::create_dir_all(&links_dir).map_err(|source| AttachError::Io {
        what: "creating",
        path: links_dir.clone(),
        source,
    })?;
    let mut done = Vec::with_capacity(HOOKS.len());
    // Every program is loaded (verified, milliseconds each) before the first link changes
    // hands, so that the takeover below is a few syscalls long.
    for hook in HOOKS {
        let program = ebpf
            .program_mut(hook.program)
            .ok_or(AttachError::MissingProgram(hook.program))?;
        load(program, &hook).map_err(|source| AttachError::Program {
            program: hook.program,
            source,
        })?;
    }
    for hook in HOOKS {
        let program_error = |source| AttachError::Program {
            program: hook.program,
            source,
        };
        let program = ebpf
            .program_mut(hook.program)
            .ok_or(AttachError::MissingProgram(hook.program))?;
        let link_path = layout.link(hook.program);
        if link_path.exists() {
            let link = sys::obj_get(&link_path).map_err(|source| AttachError::Io {
                what: "opening pinned link",
                path: link_path.clone(),
                source,
            })?;
            let info = sys::link_info(link.as_fd()).map_err(|source| AttachError::Io {
                what: "reading pinned link",
                path: link_path.clone(),
                source,
            })?;
            if !info.is_cgroup
                || info.cgroup_id != cgroup_id
                || info.attach_type != kernel_attach_type(&hook)
            {
                let found = if info.is_cgroup {
                    format!(
                        "a cgroup link on cgroup id {} (attach type {}), not id {cgroup_id}",
                        info.cgroup_id, info.attach_type
                    )
                } else {
                    "not a cgroup link".to_owned()
                };
                return Err(AttachError::Foreign {
                    path: link_path,
                    program: hook.program,
                    cgroup: cgroup.to_owned(),
                    found,
                    pin: layout.root().to_owned(),
                });
            }
            let prog_fd = program.fd().map_err(program_error)?;
            sys::link_update(link.as_fd(), prog_fd.as_fd()).map_err(|source| AttachError::Io {
                what: "updating pinned link",
                path: link_path.clone(),
                source,
            })?;
            done.push((hook, Attachment::Adopted));
        } else {
            let link = attach_link(program, &hook, &cgroup_file, &link_path)?;
            // Dropping the pinned link closes our descriptor; the pin keeps it attached.
            drop(link.pin(&link_path).map_err(|e| AttachError::Io {
                what: "pinning link",
                path: link_path.clone(),
                source: io::Error::other(e),
            })?);
            done.push((hook, Attachment::Attached));
        }
    }
    Ok(done)
}

/// What `lb cleanup` removed.
#[derive(Debug, Default)]
pub struct Cleaned {
    pub links_detached: usize,
    pub pins_removed: usize,
}

/// Detaches lb's links and removes every pin under `layout`; with `cgroup`, also detaches
/// lb links on that cgroup that have no pin any more (left by a crashed cleanup, say).
/// Idempotent: a second run finds nothing and succeeds.
pub fn cleanup(layout: &PinLayout, cgroup: Option<&Path>) -> Result<Cleaned, AttachError> {
    let mut cleaned = Cleaned::default();
    let links_dir = layout.links_dir();
    for path in entries(&links_dir)? {
        let link = sys::obj_get(&path).map_err(|source| AttachError::Io {
            what: "opening pinned link",
            path: path.clone(),
            source,
        })?;
        match sys::link_detach(link.as_fd()) {
            Ok(()) => cleaned.links_detached += 1,
            // Already detached (its cgroup was removed): nothing to do but unpin.
            Err(e)
                if e.raw_os_error() == Some(libc::ENOLINK)
                    || e.raw_os_error() == Some(libc::EINVAL) => {}
            Err(source) => {
                return Err(AttachError::Io {
                    what: "detaching link",
                    path,
                    source,
                });
            }
        }
        remove(&path, &mut cleaned)?;
    }
    for path in entries(&layout.maps_dir())? {
        remove(&path, &mut cleaned)?;
    }
    // Whatever else an lb of any layout version left: the maps an unfinished upgrade moved
    // aside (`upgrade-from-N/`, kernel/upgrade.rs), any other pin or directory of pins.
    let mut dirs = vec![links_dir, layout.maps_dir()];
    for path in entries(layout.root())? {
        if path.is_dir() {
            if !dirs.contains(&path) {
                for pin in entries(&path)? {
                    remove(&pin, &mut cleaned)?;
                }
                dirs.push(path);
            }
        } else {
            remove(&path, &mut cleaned)?;
        }
    }
    dirs.push(layout.root().to_owned());
    for dir in dirs {
        match std::fs::remove_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(AttachError::Io {
                    what: "removing",
                    path: dir,
                    source,
                });
            }
        }
    }
    if let Some(cgroup) = cgroup {
        cleaned.links_detached += detach_unpinned(cgroup)?;
    }
    Ok(cleaned)
}

fn entries(dir: &Path) -> Result<Vec<PathBuf>, AttachError> {
    match std::fs::read_dir(dir) {
        Ok(entries) => {
            let mut paths = Vec::new();
            for entry in entries {
                let entry = entry.map_err(|source| AttachError::Io {
                    what: "listing",
                    path: dir.to_owned(),
                    source,
                })?;
                paths.push(entry.path());
            }
            paths.sort();
            Ok(paths)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(source) => Err(AttachError::Io {
            what: "listing",
            path: dir.to_owned(),
            source,
        }),
    }
}

fn remove(path: &Path, cleaned: &mut Cleaned) -> Result<(), AttachError> {
    match std::fs::remove_file(path) {
        Ok(()) => {
            cleaned.pins_removed += 1;
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(AttachError::Io {
            what: "removing",
            path: path.to_owned(),
            source,
        }),
    }
}

/// Detaches every link on `cgroup` whose program is one of lb's.
fn detach_unpinned(cgroup: &Path) -> Result<usize, AttachError> {
    let io_err = |what| {
        move |source| AttachError::Io {
            what,
            path: cgroup.to_owned(),
            source,
        }
    };
    let cgroup_id = sys::cgroup_id(cgroup).map_err(io_err("reading cgroup"))?;
    let names: std::collections::HashMap<u32, String> = aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter_map(|p| p.name_as_str().map(|n| (p.id(), n.to_owned())))
        .collect();
    let mut detached = 0;
    for id in sys::link_ids().map_err(io_err("listing links for"))? {
        // A link can go away between listing and opening it.
        let Ok(link) = sys::link_fd_by_id(id) else {
            continue;
        };
        let Ok(info) = sys::link_info(link.as_fd()) else {
            continue;
        };
        let ours = names.get(&info.prog_id).is_some_and(|n| {
            n.starts_with(PROGRAM_PREFIX) && HOOKS.iter().any(|h| h.program.starts_with(n.as_str()))
        });
        if info.is_cgroup && info.cgroup_id == cgroup_id && ours {
            sys::link_detach(link.as_fd()).map_err(io_err("detaching link on"))?;
            detached += 1;
        }
    }
    Ok(detached)
}
