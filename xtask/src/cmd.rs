//! Running commands, with the environment the build needs.

use std::{
    ffi::OsStr,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

/// `$CARGO_HOME`, by default `~/.cargo`.
pub fn cargo_home() -> PathBuf {
    std::env::var_os("CARGO_HOME").map_or_else(
        || PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into())).join(".cargo"),
        PathBuf::from,
    )
}

/// The workspace root (xtask's parent).
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

/// PATH with `$CARGO_HOME/bin` in front, where `cargo install` put bpf-linker.
pub fn path_with_cargo_bin() -> std::ffi::OsString {
    let mut paths = vec![cargo_home().join("bin")];
    if let Some(path) = std::env::var_os("PATH") {
        paths.extend(std::env::split_paths(&path));
    }
    std::env::join_paths(paths).unwrap_or_default()
}

/// A command in the workspace root with the build's PATH.
pub fn command(program: impl AsRef<OsStr>) -> Command {
    let mut cmd = Command::new(program);
    cmd.current_dir(root()).env("PATH", path_with_cargo_bin());
    cmd
}

/// Runs `cmd`, failing with its description if it fails.
pub fn run(cmd: &mut Command) -> anyhow::Result<()> {
    eprintln!("+ {}", describe(cmd));
    let status = cmd
        .status()
        .with_context(|| format!("starting {}", describe(cmd)))?;
    if !status.success() {
        bail!("{} failed: {status}", describe(cmd));
    }
    Ok(())
}

/// Runs `cmd` and returns its stdout, failing if it fails.
pub fn output(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("starting {}", describe(cmd)))?;
    if !out.status.success() {
        bail!(
            "{} failed: {}\n{}",
            describe(cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Whether `program` is on the build's PATH.
pub fn have(program: &str) -> bool {
    std::env::split_paths(&path_with_cargo_bin()).any(|dir| dir.join(program).is_file())
}

/// `cargo build --release` of the agent and the test pods.
pub fn build_release() -> anyhow::Result<()> {
    run(command("cargo").args(["build", "--release"]))?;
    run(command("cargo").args(["build", "--release", "-p", "lb-tests", "--bins"]))
}

/// The built binaries.
pub fn lb_bin() -> PathBuf {
    root().join("target/release/lb")
}

pub fn testpod_bin() -> PathBuf {
    root().join("target/release/lb-testpod")
}
