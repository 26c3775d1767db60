//! Attaching the north-south programs to the `--xdp-iface` interfaces: XDP at ingress
//! (native, generic as a fallback with a warning) and tcx at egress, both through pinned
//! bpf_links (`links/xdp@IF`, `links/tc@IF`) that a restarted agent adopts by swapping its
//! programs in (`BPF_LINK_UPDATE`): no moment without a program, no second attachment.
//! `lb cleanup` detaches them with the other pinned links.

use std::{
    io,
    net::IpAddr,
    os::fd::AsFd as _,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf,
    programs::{
        LinkOrder, ProgramError, ProgramFd, SchedClassifier, TcAttachType, Xdp, XdpMode,
        links::{FdLink, LinkError, PinnedLink},
        tc::{SchedClassifierLink, TcAttachOptions},
        xdp::XdpLink,
    },
};

use super::{PinLayout, attach::Attachment, sys};

/// The XDP program.
pub const XDP_PROGRAM: &str = lb_common::programs::XDP;
/// The tc egress program.
pub const TC_PROGRAM: &str = lb_common::programs::TC_EGRESS;

#[derive(Debug, thiserror::Error)]
pub enum XdpError {
    #[error("the eBPF object has no program {0} (build bug)")]
    MissingProgram(&'static str),
    #[error("program {program} on {iface}")]
    Program {
        program: &'static str,
        iface: String,
        #[source]
        source: ProgramError,
    },
    #[error("--xdp-iface {0}: no such interface in this network namespace")]
    NoSuchInterface(String),
    #[error("{what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("pinned link {path} is not lb's {what} link. Run `lb cleanup --pin-path {pin}` first")]
    Foreign {
        path: PathBuf,
        what: &'static str,
        pin: PathBuf,
    },
}

/// What happened on one interface.
#[derive(Clone, Debug)]
pub struct IfaceAttachment {
    pub iface: String,
    pub xdp: Attachment,
    /// "native" or "generic" for a new attachment; "adopted" otherwise.
    pub mode: &'static str,
    pub tc: Attachment,
}

fn pin_path(layout: &PinLayout, kind: &str, iface: &str) -> PathBuf {
    layout.link(&format!("{kind}@{iface}"))
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> XdpError + 'a {
    move |source| XdpError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

fn link_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(LinkError) -> XdpError + 'a {
    move |e| XdpError::Io {
        what,
        path: path.to_owned(),
        source: io::Error::other(e),
    }
}

/// Whether `iface` exists here.
fn ifindex(iface: &str) -> Option<u32> {
    let name = std::ffi::CString::new(iface).ok()?;
    // SAFETY: a valid NUL-terminated string; the call only reads it.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    (index != 0).then_some(index)
}

/// Swaps `prog` into the pinned link at `path` if there is one of the right type (`check`
/// says whether it is); returns whether it did. A link whose interface is gone is unpinned
/// so that a fresh one is attached.
fn adopt(
    layout: &PinLayout,
    path: &Path,
    what: &'static str,
    prog: std::os::fd::BorrowedFd<'_>,
    check: impl FnOnce(FdLink) -> bool,
) -> Result<bool, XdpError> {
    if !path.exists() {
        return Ok(false);
    }
    let pinned = PinnedLink::from_pin(path).map_err(link_err("opening pinned link", path))?;
    if !check(FdLink::from(pinned)) {
        return Err(XdpError::Foreign {
            path: path.to_owned(),
            what,
            pin: layout.root().to_owned(),
        });
    }
    let link = sys::obj_get(path).map_err(io_err("opening pinned link", path))?;
    match sys::link_update(link.as_fd(), prog) {
        Ok(()) => Ok(true),
        // The interface went away and came back: the old link is defunct.
        Err(e) if e.raw_os_error() == Some(libc::ENOLINK) => {
            std::fs::remove_file(path).map_err(io_err("removing defunct link", path))?;
            Ok(false)
        }
        Err(source) => Err(XdpError::Io {
            what: "updating pinned link",
            path: path.to_owned(),
            source,
        }),
    }
}

/// A descriptor of our own for a loaded program (the program stays in the `Ebpf`), for
/// swapping it into a pinned link; `path` is that link's, for the error.
fn own_fd(fd: &ProgramFd, path: &Path) -> Result<std::os::fd::OwnedFd, XdpError> {
    fd.as_fd()
        .try_clone_to_owned()
        .map_err(io_err("duplicating program fd", path))
}

/// Pins a link just attached at `path`. Dropping the pinned link closes our descriptor; the
/// pin keeps it attached.
fn pin_new_link<L>(link: L, path: &Path) -> Result<(), XdpError>
where
    L: TryInto<FdLink, Error = LinkError>,
{
    let link: FdLink = link.try_into().map_err(link_err("converting link", path))?;
    drop(link.pin(path).map_err(|e| XdpError::Io {
        what: "pinning link",
        path: path.to_owned(),
        source: io::Error::other(e),
    })?);
    Ok(())
}

/// Loads the XDP and tc programs and attaches them to every interface of `ifaces` (or adopts
/// the pinned links a previous agent left there).
pub fn attach_or_adopt(
    ebpf: &mut Ebpf,
    layout: &PinLayout,
    ifaces: &[String],
) -> Result<Vec<IfaceAttachment>, XdpError> {
    if ifaces.is_empty() {
        return Ok(Vec::new());
    }
    let links_dir = layout.links_dir();
    std::fs::create_dir_all(&links_dir).map_err(io_err("creating", &links_dir))?;
    if let Some(missing) = ifaces.iter().find(|iface| ifindex(iface).is_none()) {
        return Err(XdpError::NoSuchInterface(missing.clone()));
    }
    // Every tc program before any XDP program: on an upgrade, the new tc program reads every
    // kind of conntrack entry the previous XDP program makes, but the previous tc program
    // cannot un-NAT replies of flows the new XDP program makes (a layout-5 one-entry flow is
    // unknown to layout 4's tc). Replies may leave by another interface than their flow came
    // in on, so the order holds across interfaces, and a failure half-way (an interface that
    // cannot take tc) leaves the previous XDP programs, which the new tc programs serve.
    let mut tcs = Vec::with_capacity(ifaces.len());
    for iface in ifaces {
        tcs.push(attach_tc(ebpf, layout, iface)?);
    }
    let mut done = Vec::with_capacity(ifaces.len());
    for (iface, tc) in ifaces.iter().zip(tcs) {
        let (xdp, mode) = attach_xdp(ebpf, layout, iface)?;
        done.push(IfaceAttachment {
            iface: iface.clone(),
            xdp,
            mode,
            tc,
        });
    }
    Ok(done)
}

fn attach_xdp(
    ebpf: &mut Ebpf,
    layout: &PinLayout,
    iface: &str,
) -> Result<(Attachment, &'static str), XdpError> {
    let program_error = |source| XdpError::Program {
        program: XDP_PROGRAM,
        iface: iface.to_owned(),
        source,
    };
    let program: &mut Xdp = ebpf
        .program_mut(XDP_PROGRAM)
        .ok_or(XdpError::MissingProgram(XDP_PROGRAM))?
        .try_into()
        .map_err(program_error)?;
    if program.fd().is_err() {
        program.load().map_err(program_error)?;
    }
    let path = pin_path(layout, "xdp", iface);
    let prog_fd = own_fd(program.fd().map_err(program_error)?, &path)?;
    if adopt(layout, &path, "XDP", prog_fd.as_fd(), |l| {
        XdpLink::try_from(l).is_ok()
    })? {
        return Ok((Attachment::Adopted, "adopted"));
    }
    let (id, mode) = match program.attach(iface, XdpMode::Driver) {
        Ok(id) => (id, "native"),
        Err(native) => {
            tracing::warn!(
                iface,
                error = %native,
                "native XDP refused by the driver; using generic XDP (slower, same behaviour)"
            );
            (
                program.attach(iface, XdpMode::Skb).map_err(program_error)?,
                "generic",
            )
        }
    };
    pin_new_link(program.take_link(id).map_err(program_error)?, &path)?;
    Ok((Attachment::Attached, mode))
}

fn attach_tc(ebpf: &mut Ebpf, layout: &PinLayout, iface: &str) -> Result<Attachment, XdpError> {
    let program_error = |source| XdpError::Program {
        program: TC_PROGRAM,
        iface: iface.to_owned(),
        source,
    };
    let program: &mut SchedClassifier = ebpf
        .program_mut(TC_PROGRAM)
        .ok_or(XdpError::MissingProgram(TC_PROGRAM))?
        .try_into()
        .map_err(program_error)?;
    if program.fd().is_err() {
        program.load().map_err(program_error)?;
    }
    let path = pin_path(layout, "tc", iface);
    let prog_fd = own_fd(program.fd().map_err(program_error)?, &path)?;
    if adopt(layout, &path, "tcx egress", prog_fd.as_fd(), |l| {
        SchedClassifierLink::try_from(l).is_ok()
    })? {
        return Ok(Attachment::Adopted);
    }
    let id = program
        .attach_with_options(
            iface,
            TcAttachType::Egress,
            TcAttachOptions::TcxOrder(LinkOrder::default()),
        )
        .map_err(program_error)?;
    pin_new_link(program.take_link(id).map_err(program_error)?, &path)?;
    Ok(Attachment::Attached)
}

/// The addresses of `ifaces` (the `--node-ip` default): global and site addresses, not
/// link-local ones (a NodePort is not served on fe80::/10 or 169.254/16).
pub fn iface_addresses(ifaces: &[String]) -> io::Result<Vec<IpAddr>> {
    let mut out = Vec::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we free below with freeifaddrs.
    if unsafe { libc::getifaddrs(&raw mut head) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: a node of the list getifaddrs returned, alive until freeifaddrs.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_addr.is_null() || ifa.ifa_name.is_null() {
            continue;
        }
        // SAFETY: a NUL-terminated name owned by the list.
        let name = unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) }.to_string_lossy();
        if !ifaces.iter().any(|i| *i == name) {
            continue;
        }
        // SAFETY: ifa_addr is non-null and its family says which sockaddr it is.
        let ip = unsafe {
            match i32::from((*ifa.ifa_addr).sa_family) {
                libc::AF_INET => {
                    let sin = &*ifa.ifa_addr.cast::<libc::sockaddr_in>();
                    IpAddr::from(sin.sin_addr.s_addr.to_ne_bytes())
                }
                libc::AF_INET6 => {
                    let sin6 = &*ifa.ifa_addr.cast::<libc::sockaddr_in6>();
                    IpAddr::from(sin6.sin6_addr.s6_addr)
                }
                _ => continue,
            }
        };
        let link_local = match ip {
            IpAddr::V4(v4) => v4.is_link_local(),
            IpAddr::V6(v6) => v6.is_unicast_link_local(),
        };
        if !link_local && !out.contains(&ip) {
            out.push(ip);
        }
    }
    // SAFETY: the list getifaddrs returned, freed once.
    unsafe { libc::freeifaddrs(head) };
    Ok(out)
}
