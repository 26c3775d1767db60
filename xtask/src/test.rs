//! `cargo xtask test`: the README's test command and what CI runs. Lints, host unit tests,
//! then the privileged integration tests against the real kernel. A skipped (ignored)
//! test fails the run: privileged tests must really run.

use std::io::{BufRead as _, BufReader};

use anyhow::{Context as _, bail};

use crate::{
    cmd::{self, command},
    previous, setup,
};

pub fn run(filter: Option<&str>) -> anyhow::Result<()> {
    cmd::require_root("the integration tests")?;
    setup::run()?;
    cmd::run(command("cargo").args(["fmt", "--all", "--check"]))?;
    // Host crates; AYA_BUILD_SKIP keeps `clippy`/unit tests from building the BPF object,
    // which the release build below does once.
    cmd::run(
        command("cargo")
            .args([
                "clippy",
                "--workspace",
                "--exclude",
                "lb-ebpf",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ])
            .env("AYA_BUILD_SKIP", "1"),
    )?;
    cmd::run(command("cargo").args([
        "+nightly",
        "clippy",
        "-p",
        "lb-ebpf",
        "--release",
        "--target",
        "bpfel-unknown-none",
        "-Z",
        "build-std=core",
        "--",
        "-D",
        "warnings",
    ]))?;
    cmd::run(
        command("cargo")
            .args([
                "test",
                "--workspace",
                "--exclude",
                "lb-ebpf",
                "--exclude",
                "lb-tests",
            ])
            .env("AYA_BUILD_SKIP", "1"),
    )?;
    // Before the main build: it leaves its lb at target/release/lb, which the main build
    // then replaces with the current one.
    previous::build()?;
    cmd::build_release()?;
    integration(filter)
}

/// Runs the lb-tests crate and checks that nothing was ignored.
fn integration(filter: Option<&str>) -> anyhow::Result<()> {
    let mut cargo = command("cargo");
    cargo
        .args([
            "test",
            "--release",
            "-p",
            "lb-tests",
            "--",
            "--test-threads",
            "3",
        ])
        .args(filter)
        .env("LB_BIN", cmd::lb_bin())
        .env("LB_TESTPOD", cmd::testpod_bin())
        .env("LB_PREVIOUS_BIN", previous::bin())
        .stdout(std::process::Stdio::piped());
    eprintln!("+ {}", cmd::describe(&cargo));
    let mut child = cargo.spawn().context("starting cargo test")?;
    let stdout = child.stdout.take().context("cargo test stdout")?;
    let (mut passed, mut ignored) = (0u64, 0u64);
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        println!("{line}");
        if let Some(summary) = line.strip_prefix("test result: ") {
            passed += count(summary, "passed");
            ignored += count(summary, "ignored");
        }
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("integration tests failed");
    }
    if ignored > 0 {
        bail!("{ignored} integration tests were skipped: privileged tests must run");
    }
    if passed == 0 {
        bail!("no integration test ran");
    }
    eprintln!("integration: {passed} passed, none skipped");
    Ok(())
}

/// The number before `what` in a libtest summary ("ok. 16 passed; 0 failed; 0 ignored; ...").
fn count(summary: &str, what: &str) -> u64 {
    summary
        .split(';')
        .find_map(|part| {
            part.trim()
                .strip_suffix(what)
                .and_then(|n| n.trim().rsplit(' ').next()?.parse().ok())
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    #[test]
    fn summary_counts() {
        let s = "ok. 16 passed; 0 failed; 2 ignored; 0 measured; 0 filtered out; finished in 6.96s";
        assert_eq!(super::count(s, "passed"), 16);
        assert_eq!(super::count(s, "ignored"), 2);
        assert_eq!(
            super::count("FAILED. 1 passed; 3 failed; 0 ignored", "failed"),
            3
        );
    }
}
