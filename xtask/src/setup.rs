//! `cargo xtask setup`: installs what building and testing lb need, idempotently, so a fresh
//! machine (and CI) gets from `git clone` to `target/release/lb` with one command.
//! `cargo xtask demo` installs only the toolchain parts and the demo's packages.
//!
//! - nightly `rust-src` (aya-build compiles lb-ebpf with `-Z build-std=core`);
//! - bpf-linker 0.13.0, linked against the nightly's own LLVM: a plain `cargo install
//!   bpf-linker` looks for a system LLVM that is not there;
//! - Debian packages: bpftool (tests read attachments with it), iproute2 and util-linux
//!   (netns, nsenter), curl (demo), iptables, nftables and iperf3 (bench peers), prometheus
//!   (prometheus and promtool, for the alerting-rule tests), buildah, podman and runc (the
//!   container image test).

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};

use crate::cmd::{self, cargo_home, command, have};

const BPF_LINKER_VERSION: &str = "0.13.0";

/// What `cargo xtask demo` needs (the harness's namespaces and cgroups, curl): Debian
/// packages and a command each provides.
const DEMO_PACKAGES: &[(&str, &str)] = &[
    ("bpftool", "bpftool"),
    ("iproute2", "ip"),
    ("util-linux", "nsenter"),
    ("curl", "curl"),
];

/// What the tests and the bench need beyond the demo's.
const PACKAGES: &[(&str, &str)] = &[
    ("iptables", "iptables-restore"),
    ("nftables", "nft"),
    ("iperf3", "iperf3"),
    // The alerting-rule tests: promtool checks and unit-tests deploy/prometheus, and a real
    // Prometheus scrapes a real lb (tests/tests/operability.rs).
    ("prometheus", "prometheus"),
    ("prometheus", "promtool"),
    // The container image: built with buildah from deploy/Containerfile, run with podman as
    // deploy/daemonset.yaml says (tests/tests/container.rs). runc, because Debian 12's crun
    // refuses hybrid cgroup hosts.
    ("buildah", "buildah"),
    ("podman", "podman"),
    ("runc", "runc"),
];

/// Debian packages that provide a file rather than a command.
const FILES: &[(&str, &str)] = &[(
    "fonts-dejavu-core",
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
)];

/// What to set up for.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum For {
    /// Everything: build, tests, bench.
    All,
    /// Only what `cargo xtask demo` runs: the build, and the demo's packages.
    Demo,
}

pub fn run() -> anyhow::Result<()> {
    run_for(For::All)
}

pub fn run_for(what: For) -> anyhow::Result<()> {
    rust_src()?;
    bpf_linker()?;
    packages(what)?;
    eprintln!(
        "setup: done (bpf-linker is in {}; cargo xtask puts it on PATH)",
        cargo_home().join("bin").display()
    );
    Ok(())
}

fn rust_src() -> anyhow::Result<()> {
    let installed = cmd::output(command("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))
    .context("rustup is needed, with a nightly toolchain")?;
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        return Ok(());
    }
    cmd::run(command("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))
}

fn bpf_linker_ok() -> bool {
    have("bpf-linker")
        && cmd::output(command("bpf-linker").arg("--version"))
            .is_ok_and(|v| v.contains(BPF_LINKER_VERSION))
}

/// The nightly's LLVM shared library (`libLLVM.so.<ver>-rust-<ver>-nightly`) and its major version.
fn nightly_llvm() -> anyhow::Result<(PathBuf, String)> {
    let sysroot = cmd::output(command("rustc").args(["+nightly", "--print", "sysroot"]))?;
    let lib = Path::new(sysroot.trim()).join("lib");
    for entry in std::fs::read_dir(&lib).with_context(|| format!("listing {}", lib.display()))? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if let Some(version) = name.strip_prefix("libLLVM.so.") {
            let major = version.split('.').next().unwrap_or_default().to_owned();
            return Ok((lib.join(&name), major));
        }
    }
    bail!(
        "no libLLVM.so.* in {}: is the nightly toolchain complete?",
        lib.display()
    )
}

fn bpf_linker() -> anyhow::Result<()> {
    if bpf_linker_ok() {
        return Ok(());
    }
    let (llvm, major) = nightly_llvm()?;
    // LLVM_PREFIX/lib must hold libLLVM.so (to link) and the SONAME (to run); bpf-linker's
    // rpath points here, so this directory stays.
    let prefix = cargo_home().join("bpf-linker-llvm");
    let lib = prefix.join("lib");
    std::fs::create_dir_all(&lib).with_context(|| format!("creating {}", lib.display()))?;
    let soname = llvm.file_name().context("libLLVM file name")?;
    for link in [lib.join("libLLVM.so"), lib.join(soname)] {
        let _stale = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&llvm, &link)
            .with_context(|| format!("linking {}", link.display()))?;
    }
    cmd::run(
        command("cargo")
            .args([
                "install",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
                "--no-default-features",
                "--features",
            ])
            .arg(format!("llvm-{major}"))
            .env("LLVM_PREFIX", &prefix),
    )?;
    if !bpf_linker_ok() {
        bail!("bpf-linker {BPF_LINKER_VERSION} is still not usable after installing it");
    }
    Ok(())
}

fn packages(what: For) -> anyhow::Result<()> {
    let rest = if what == For::All { PACKAGES } else { &[] };
    let mut missing: Vec<&str> = DEMO_PACKAGES
        .iter()
        .chain(rest)
        .filter(|(_, tool)| !have_system(tool))
        .map(|(pkg, _)| *pkg)
        .collect();
    if what == For::All {
        missing.extend(
            FILES
                .iter()
                .filter(|(_, file)| !Path::new(file).is_file())
                .map(|(pkg, _)| *pkg),
        );
    }
    missing.dedup();
    if missing.is_empty() {
        return Ok(());
    }
    if !have_system("apt-get") {
        bail!("missing {missing:?} and no apt-get to install them with; install them by hand");
    }
    let install = |update: bool| -> anyhow::Result<()> {
        if update {
            cmd::run(
                command("apt-get")
                    .args(["update", "-q"])
                    .env("DEBIAN_FRONTEND", "noninteractive"),
            )?;
        }
        cmd::run(
            command("apt-get")
                .args(["install", "-y", "-q", "--no-install-recommends"])
                .args(&missing)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )
    };
    // A fresh machine's package lists may be stale or empty: update and retry once.
    install(false).or_else(|_| install(true))
}

/// Whether a system tool is installed (PATH plus the sbin directories root has).
fn have_system(tool: &str) -> bool {
    have(tool)
        || ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
            .iter()
            .any(|d| Path::new(d).join(tool).is_file())
}
