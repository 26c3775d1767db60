use anyhow::{Context as _, anyhow};

/// Builds lb-ebpf for the BPF target (nightly, `-Z build-std=core`, bpf-linker) and leaves the
/// object at `$OUT_DIR/lb-bpf`, which `src/kernel/object.rs` embeds.
fn main() -> anyhow::Result<()> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?;
    let root = std::path::Path::new(&manifest_dir)
        .parent()
        .ok_or_else(|| anyhow!("{manifest_dir} has no parent"))?;
    let ebpf_dir = root.join("lb-ebpf");
    let common_dir = root.join("lb-common");
    // aya-build watches lb-ebpf; the kernel/user types live in lb-common, so a change there
    // must rebuild the object too, or the agent would embed programs with the old layout.
    println!("cargo:rerun-if-changed={}", common_dir.display());
    let ebpf_dir = ebpf_dir
        .to_str()
        .ok_or_else(|| anyhow!("non-UTF-8 path {}", ebpf_dir.display()))?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "lb-ebpf",
            root_dir: ebpf_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )?;
    // With AYA_BUILD_SKIP=1 (cargo check/clippy without nightly) there is no object: embed an
    // empty one, which the agent reports as such when asked to load it.
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR").context("OUT_DIR")?).join("lb-bpf");
    if !out.exists() {
        std::fs::write(&out, []).with_context(|| format!("writing {}", out.display()))?;
    }
    Ok(())
}
