//! `cargo xtask fuzz`: runs each cargo-fuzz target in `fuzz/` for a bounded time, starting
//! from the seed corpus in the repository (every bad-input case of the unit tests), and
//! fails on any crash, panic, leak, timeout (an input that takes longer than `TIMEOUT_S`
//! seconds: a hang) or out-of-memory. New inputs go to a scratch directory, so the
//! checked-in corpus changes only when someone copies a finding there on purpose.

use anyhow::Context as _;

use crate::cmd::{self, cargo_home, command, have};

/// The targets in `fuzz/fuzz_targets/`.
const TARGETS: &[&str] = &["manifest_file", "api_objects"];
/// Seconds one input may take before libFuzzer reports it as a timeout (a hang).
const TIMEOUT_S: u32 = 10;
/// Memory one run may use before libFuzzer reports it as out-of-memory.
const RSS_LIMIT_MB: u32 = 4096;
/// Largest input libFuzzer generates: room for nested and multi-document manifests.
const MAX_LEN: u32 = 65_536;
const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// Installs cargo-fuzz when it is missing (cargo install from crates.io).
pub fn setup() -> anyhow::Result<()> {
    if have("cargo-fuzz") {
        return Ok(());
    }
    cmd::run(command("cargo").args([
        "install",
        "--locked",
        "cargo-fuzz",
        "--version",
        CARGO_FUZZ_VERSION,
    ]))
    .context("installing cargo-fuzz")?;
    eprintln!(
        "fuzz: cargo-fuzz installed in {}",
        cargo_home().join("bin").display()
    );
    Ok(())
}

/// Runs every target for `seconds`.
pub fn run(seconds: u32) -> anyhow::Result<()> {
    setup()?;
    let root = cmd::root();
    for target in TARGETS {
        let scratch = std::env::temp_dir().join(format!("lb-fuzz-{target}-{}", std::process::id()));
        std::fs::create_dir_all(&scratch)
            .with_context(|| format!("creating {}", scratch.display()))?;
        let seeds = root.join("fuzz").join("corpus").join(target);
        let result = cmd::run(
            command("cargo")
                .current_dir(root.join("fuzz"))
                // The fuzz targets need no BPF object.
                .env("AYA_BUILD_SKIP", "1")
                .args(["+nightly", "fuzz", "run", target])
                .arg(&scratch)
                .arg(&seeds)
                .arg("--")
                .arg(format!("-max_total_time={seconds}"))
                .arg(format!("-timeout={TIMEOUT_S}"))
                .arg(format!("-rss_limit_mb={RSS_LIMIT_MB}"))
                .arg(format!("-max_len={MAX_LEN}"))
                .arg("-print_final_stats=1"),
        );
        let _ignored = std::fs::remove_dir_all(&scratch);
        result.with_context(|| {
            format!(
                "fuzz target {target} found a problem: the input is in fuzz/artifacts/{target}/; \
                 reproduce with `cd fuzz && cargo +nightly fuzz run {target} <file>`"
            )
        })?;
    }
    Ok(())
}
