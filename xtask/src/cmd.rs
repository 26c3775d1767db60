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

/// Runs `cmd` without echoing it, failing with its stderr if it fails.
pub fn run_quiet(cmd: &mut Command) -> anyhow::Result<()> {
    output(cmd).map(drop)
}

/// Runs `cmd` with `input` on stdin; returns its run time, or `None` if it was still running
/// after `budget` (it is killed then). Fails if it fails.
pub fn timed_with_input(
    cmd: &mut Command,
    input: &str,
    budget: std::time::Duration,
) -> anyhow::Result<Option<std::time::Duration>> {
    use std::{io::Write as _, process::Stdio, time::Instant};
    let started = Instant::now();
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", describe(cmd)))?;
    let mut stdin = child.stdin.take().context("stdin")?;
    let input = input.to_owned();
    let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
    loop {
        if let Some(status) = child.try_wait()? {
            let elapsed = started.elapsed();
            let _written = writer.join();
            if !status.success() {
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    let _read = std::io::Read::read_to_string(&mut e, &mut err);
                }
                bail!(
                    "{} failed: {status}: {}",
                    describe(cmd),
                    err.lines().take(5).collect::<Vec<_>>().join("\n")
                );
            }
            return Ok(Some(elapsed));
        }
        if started.elapsed() > budget {
            let _killed = child.kill();
            let _reaped = child.wait();
            return Ok(None);
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// Fails unless this is root: `what` needs it.
pub fn require_root(what: &str) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("{what} creates network namespaces and loads BPF programs: run as root");
    }
    Ok(())
}

/// Builds only what the demo runs: `lb` and the test pods, not xtask again in release (the
/// bench's plotting) nor the other targets. `--bin lb` keeps the packages (and so the
/// features) of [`build_release`], so the two share their build cache: `-p lb-userspace`
/// resolves features on its own and rebuilds lb (measured: 1 min 8 s on a warm cache).
pub fn build_demo() -> anyhow::Result<()> {
    run(command("cargo").args(["build", "--release", "--bin", "lb"]))?;
    run(command("cargo").args(["build", "--release", "-p", "lb-tests", "--bins"]))
}

/// The start of the privileged tasks that drive lb themselves (demo, bench): root, the test
/// harness pointed at this build's binaries, interrupts cleaned up after, then setup and
/// the build for `purpose` (skipped when `LB_XTASK_PREBUILT` is set).
pub fn prepare_privileged(what: &str, purpose: crate::setup::For) -> anyhow::Result<()> {
    require_root(what)?;
    // SAFETY: no other thread exists yet (the signal thread starts below); the harness reads
    // these to find the binaries.
    unsafe {
        std::env::set_var("LB_BIN", lb_bin());
        std::env::set_var("LB_TESTPOD", testpod_bin());
    }
    lb_tests::cleanup_on_signal();
    crate::setup::run_for(purpose)?;
    if std::env::var_os("LB_XTASK_PREBUILT").is_some() {
        // The binaries in target/release as they are (comparing two builds in one session:
        // swap them between runs).
        return Ok(());
    }
    match purpose {
        crate::setup::For::Demo => build_demo(),
        crate::setup::For::All => build_release(),
    }
}
