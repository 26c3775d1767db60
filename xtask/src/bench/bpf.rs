//! Raw `bpf(2)` calls for the XDP rows: maps, loading the bench's own test-run harness,
//! `BPF_PROG_TEST_RUN`. Attribute layouts are `union bpf_attr` in include/uapi/linux/bpf.h.

use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};

use anyhow::{Context as _, bail};

const BPF_MAP_CREATE: i64 = 0;
const BPF_MAP_LOOKUP_ELEM: i64 = 1;
const BPF_MAP_UPDATE_ELEM: i64 = 2;
const BPF_PROG_LOAD: i64 = 5;
const BPF_OBJ_GET: i64 = 7;
const BPF_PROG_TEST_RUN: i64 = 10;
const BPF_PROG_GET_FD_BY_ID: i64 = 13;
const BPF_OBJ_GET_INFO_BY_FD: i64 = 15;
const BPF_LINK_CREATE: i64 = 28;

pub const BPF_MAP_TYPE_ARRAY: u32 = 2;
pub const BPF_MAP_TYPE_PROG_ARRAY: u32 = 3;
const BPF_PROG_TYPE_XDP: u32 = 6;
/// `enum bpf_attach_type`'s `BPF_XDP`: what aya loads lb's XDP program with, so the harness's
/// program array accepts both.
const BPF_XDP: u32 = 37;

/// One `bpf(2)` call on a zeroed 128-byte attribute with `fields` (offset, value, width) set;
/// returns the result and the attribute as the kernel left it.
fn bpf(cmd: i64, fields: &[(usize, u64, usize)]) -> std::io::Result<(i64, [u8; 128])> {
    let mut attr = [0u8; 128];
    for &(off, value, len) in fields {
        attr[off..off + len].copy_from_slice(&value.to_ne_bytes()[..len]);
    }
    // SAFETY: a 128-byte attribute (the kernel accepts a prefix of union bpf_attr and checks
    // that the rest is zero); every pointer in it points at a live buffer of the stated size.
    let ret = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len()) };
    if ret < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((ret, attr))
}

fn owned(fd: i64) -> anyhow::Result<OwnedFd> {
    let fd = i32::try_from(fd).context("descriptor out of range")?;
    // SAFETY: a descriptor the kernel just returned, owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn ptr<T>(p: *const T) -> u64 {
    p as u64
}

fn fd_u64(fd: &OwnedFd) -> u64 {
    u64::try_from(fd.as_raw_fd()).unwrap_or_default()
}

fn len_u64(len: usize) -> u64 {
    u64::try_from(len).unwrap_or(u64::MAX)
}

pub fn map_create(kind: u32, key: u32, value: u32, max: u32) -> anyhow::Result<OwnedFd> {
    let (fd, _) = bpf(
        BPF_MAP_CREATE,
        &[
            (0, u64::from(kind), 4),
            (4, u64::from(key), 4),
            (8, u64::from(value), 4),
            (12, u64::from(max), 4),
        ],
    )
    .context("BPF_MAP_CREATE")?;
    owned(fd)
}

pub fn map_update(map: &OwnedFd, key: &[u8], value: &[u8]) -> anyhow::Result<()> {
    bpf(
        BPF_MAP_UPDATE_ELEM,
        &[
            (0, fd_u64(map), 4),
            (8, ptr(key.as_ptr()), 8),
            (16, ptr(value.as_ptr()), 8),
        ],
    )
    .context("BPF_MAP_UPDATE_ELEM")?;
    Ok(())
}

/// Loads an XDP program of `insns` (8-byte instructions); the verifier's log on failure.
pub fn prog_load(name: &str, insns: &[[u8; 8]]) -> anyhow::Result<OwnedFd> {
    let license = c"GPL";
    let mut log = vec![0u8; 1 << 16];
    let mut fields = vec![
        (0, u64::from(BPF_PROG_TYPE_XDP), 4),
        (4, len_u64(insns.len()), 4),
        (8, ptr(insns.as_ptr()), 8),
        (16, ptr(license.as_ptr()), 8),
        (24, 1, 4),
        (28, len_u64(log.len()), 4),
        (32, ptr(log.as_mut_ptr()), 8),
        (68, u64::from(BPF_XDP), 4),
    ];
    let mut prog_name = [0u8; 8];
    for (b, c) in prog_name.iter_mut().zip(name.bytes().take(7)) {
        *b = c;
    }
    fields.push((48, u64::from_ne_bytes(prog_name), 8));
    match bpf(BPF_PROG_LOAD, &fields) {
        Ok((fd, _)) => owned(fd),
        Err(e) => {
            let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
            bail!(
                "loading {name}: {e}\n{}",
                String::from_utf8_lossy(&log[..end])
            )
        }
    }
}

/// The map pinned at `path`.
pub fn map_of_pin(path: &std::path::Path) -> anyhow::Result<OwnedFd> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())?;
    let (fd, _) = bpf(BPF_OBJ_GET, &[(0, ptr(c.as_ptr()), 8)])
        .with_context(|| format!("BPF_OBJ_GET {}", path.display()))?;
    owned(fd)
}

/// The sum over CPUs of the `u64` at `key` of a per-CPU array.
pub fn per_cpu_sum(map: &OwnedFd, key: u32) -> anyhow::Result<u64> {
    // One u64 per possible CPU; the kernel fills as many as there are.
    let mut values = vec![0u64; 4096];
    let key = key.to_ne_bytes();
    bpf(
        BPF_MAP_LOOKUP_ELEM,
        &[
            (0, fd_u64(map), 4),
            (8, ptr(key.as_ptr()), 8),
            (16, ptr(values.as_mut_ptr()), 8),
        ],
    )
    .context("BPF_MAP_LOOKUP_ELEM")?;
    Ok(values.iter().sum())
}

/// The program behind the BPF link pinned at `path`.
pub fn prog_of_link(path: &std::path::Path) -> anyhow::Result<OwnedFd> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())?;
    let (link, _) = bpf(BPF_OBJ_GET, &[(0, ptr(c.as_ptr()), 8)])
        .with_context(|| format!("BPF_OBJ_GET {}", path.display()))?;
    let link = owned(link)?;
    // struct bpf_link_info: type, id, prog_id, ...
    let mut info = [0u8; 256];
    bpf(
        BPF_OBJ_GET_INFO_BY_FD,
        &[
            (0, fd_u64(&link), 4),
            (4, len_u64(info.len()), 4),
            (8, ptr(info.as_mut_ptr()), 8),
        ],
    )
    .context("link info")?;
    let prog_id = u32::from_ne_bytes([info[8], info[9], info[10], info[11]]);
    let (prog, _) =
        bpf(BPF_PROG_GET_FD_BY_ID, &[(0, u64::from(prog_id), 4)]).context("prog by id")?;
    owned(prog)
}

/// One `BPF_PROG_TEST_RUN`: verdict, the packet after the last iteration, and the kernel's
/// duration (ns per iteration, averaged over `repeat`).
pub struct Run {
    pub verdict: u32,
    pub out: Vec<u8>,
    pub ns: u32,
}

pub fn test_run(prog: &OwnedFd, packet: &[u8], repeat: u32) -> anyhow::Result<Run> {
    let mut out = vec![0u8; packet.len() + 256];
    let (_, attr) = bpf(
        BPF_PROG_TEST_RUN,
        &[
            (0, fd_u64(prog), 4),
            (8, len_u64(packet.len()), 4),
            (12, len_u64(out.len()), 4),
            (16, ptr(packet.as_ptr()), 8),
            (24, ptr(out.as_mut_ptr()), 8),
            (32, u64::from(repeat), 4),
        ],
    )
    .context("BPF_PROG_TEST_RUN")?;
    let word =
        |off: usize| u32::from_ne_bytes([attr[off], attr[off + 1], attr[off + 2], attr[off + 3]]);
    let size = usize::try_from(word(12))?;
    out.truncate(size);
    Ok(Run {
        verdict: word(4),
        out,
        ns: word(36),
    })
}

/// Attaches XDP program `prog` to interface `ifindex` of the calling thread's network
/// namespace by a BPF link (driver mode where the driver has it, as veth does); detached when
/// the returned descriptor closes.
pub fn xdp_link(prog: &OwnedFd, ifindex: u32) -> anyhow::Result<OwnedFd> {
    let (fd, _) = bpf(
        BPF_LINK_CREATE,
        &[
            (0, fd_u64(prog), 4),
            (4, u64::from(ifindex), 4),
            (8, u64::from(BPF_XDP), 4),
        ],
    )
    .context("BPF_LINK_CREATE (XDP)")?;
    owned(fd)
}

/// A tiny BPF assembler: instructions with jumps to named labels.
#[derive(Default)]
pub struct Asm {
    insns: Vec<[u8; 8]>,
    /// (instruction index, label) of jumps to resolve.
    jumps: Vec<(usize, &'static str)>,
    labels: Vec<(&'static str, usize)>,
}

impl Asm {
    pub fn raw(&mut self, code: u8, dst: u8, src: u8, off: i16, imm: i32) -> &mut Self {
        let mut i = [0u8; 8];
        i[0] = code;
        i[1] = (dst & 0xf) | (src << 4);
        i[2..4].copy_from_slice(&off.to_le_bytes());
        i[4..8].copy_from_slice(&imm.to_le_bytes());
        self.insns.push(i);
        self
    }

    /// A conditional or plain jump (`code`) to `label`.
    pub fn jump(&mut self, code: u8, dst: u8, src: u8, imm: i32, label: &'static str) -> &mut Self {
        self.jumps.push((self.insns.len(), label));
        self.raw(code, dst, src, 0, imm)
    }

    pub fn label(&mut self, name: &'static str) -> &mut Self {
        self.labels.push((name, self.insns.len()));
        self
    }

    /// `ld_imm64 dst, map_fd` (BPF_PSEUDO_MAP_FD).
    pub fn map_fd(&mut self, dst: u8, map: &OwnedFd) -> &mut Self {
        self.raw(0x18, dst, 1, 0, map.as_raw_fd());
        self.raw(0, 0, 0, 0, 0)
    }

    pub fn finish(mut self) -> anyhow::Result<Vec<[u8; 8]>> {
        for &(at, label) in &self.jumps {
            let target = self
                .labels
                .iter()
                .find(|(l, _)| *l == label)
                .with_context(|| format!("no label {label}"))?
                .1;
            let off = i16::try_from(isize::try_from(target)? - isize::try_from(at)? - 1)?;
            self.insns[at][2..4].copy_from_slice(&off.to_le_bytes());
        }
        Ok(self.insns)
    }
}
