//! The lb of the previous layout version, built from its release commit, for the upgrade test
//! (`tests/tests/upgrade.rs`: live sockets and flows across a takeover of that release's pins).
//!
//! The commit's tree is exported with `git archive` into `target/layout-N/src` and built there
//! with the workspace's own target directory (`CARGO_TARGET_DIR`), so the registry
//! dependencies of the main build are reused and only lb's own crates (and its eBPF object) are
//! compiled again. Its `lb-common` and `lb-userspace` packages are renamed first
//! ([`rename_packages`]): cargo names a workspace crate's artifacts by its path relative to the
//! workspace root, the same in both trees, so without the rename the two builds would take
//! each other's artifacts for fresh, among them lb-userspace's build-script output, the
//! embedded eBPF object (seen: the old lb embedded the current programs, and the other way
//! round). That build leaves its `lb` at `target/release/lb`; it is copied to
//! `target/layout-N/lb` at once, and the main build, which runs after it, puts the current
//! `lb` back (cargo links a binary into place on every build, also when it is fresh).

use std::path::PathBuf;

use anyhow::{Context as _, bail};

use crate::cmd::{self, command};

/// The release commit of the previous layout: layout 4, main at 4c31145 (2026-11-30).
pub const COMMIT: &str = "4c31145a19722ce555b51dfbfaedd9baeaeca404";
/// Its layout version (`lb_common::maps::LAYOUT_VERSION` there).
pub const LAYOUT: u32 = 4;

fn dir() -> PathBuf {
    cmd::root().join(format!("target/layout-{LAYOUT}"))
}

/// Where the built binary is.
pub fn bin() -> PathBuf {
    dir().join("lb")
}

/// Builds the previous release's `lb` once (a stamp names the commit it was built from).
/// Fails, never skips, when the commit is not in this clone.
pub fn build() -> anyhow::Result<()> {
    let stamp = dir().join("commit");
    if bin().is_file() && std::fs::read_to_string(&stamp).is_ok_and(|s| s.trim() == COMMIT) {
        eprintln!("lb of layout {LAYOUT} already built at {}", bin().display());
        return Ok(());
    }
    let object = format!("{COMMIT}^{{commit}}");
    if cmd::run_quiet(command("git").args(["cat-file", "-e", &object])).is_err() {
        bail!(
            "commit {COMMIT} (the lb release of layout {LAYOUT}, which the upgrade test starts \
             before the current lb) is not in this clone of the repository: clone it with its \
             full history (`git clone` without --depth, or `git fetch --unshallow`)"
        );
    }
    let src = dir().join("src");
    if src.exists() {
        std::fs::remove_dir_all(&src).with_context(|| format!("removing {}", src.display()))?;
    }
    std::fs::create_dir_all(&src).with_context(|| format!("creating {}", src.display()))?;
    let started = std::time::Instant::now();
    let archive = dir().join("src.tar");
    cmd::run(command("git").args([
        "archive",
        "--format=tar",
        "-o",
        archive.to_str().context("non-UTF-8 target path")?,
        COMMIT,
    ]))?;
    cmd::run(command("tar").arg("-xf").arg(&archive).arg("-C").arg(&src))?;
    std::fs::remove_file(&archive).with_context(|| format!("removing {}", archive.display()))?;
    rename_packages(&src)?;
    // The same command as the main build (`cmd::build_demo`), so features resolve alike and
    // the dependencies' artifacts are shared.
    cmd::run(
        command("cargo")
            .args(["build", "--release", "--bin", "lb"])
            .current_dir(&src)
            .env("CARGO_TARGET_DIR", cmd::root().join("target")),
    )?;
    let built = cmd::root().join("target/release/lb");
    let tmp = dir().join("lb.tmp");
    std::fs::copy(&built, &tmp).with_context(|| format!("copying {}", built.display()))?;
    std::fs::rename(&tmp, bin()).with_context(|| format!("renaming to {}", bin().display()))?;
    std::fs::write(&stamp, COMMIT).with_context(|| format!("writing {}", stamp.display()))?;
    eprintln!(
        "built the lb of layout {LAYOUT} ({COMMIT}) in {:.0} s: {}",
        started.elapsed().as_secs_f64(),
        bin().display()
    );
    Ok(())
}

/// Renames the release tree's `lb-common` and `lb-userspace` packages (crate names kept:
/// `lb_common` through the dependency key, `lb_userspace` through `[lib] name`), so that
/// their artifacts, and the eBPF object the build script embeds, are never shared with the
/// current tree's (module docs). Fails if a manifest does not read as expected.
fn rename_packages(src: &std::path::Path) -> anyhow::Result<()> {
    let suffix = format!("-layout{LAYOUT}");
    let edits: [(&str, String, String); 3] = [
        (
            "Cargo.toml",
            r#"lb-common = { path = "lb-common","#.to_owned(),
            format!(r#"lb-common = {{ path = "lb-common", package = "lb-common{suffix}","#),
        ),
        (
            "lb-common/Cargo.toml",
            "name = \"lb-common\"\n".to_owned(),
            format!("name = \"lb-common{suffix}\"\n"),
        ),
        (
            "lb-userspace/Cargo.toml",
            "name = \"lb-userspace\"\n".to_owned(),
            format!("name = \"lb-userspace{suffix}\"\n"),
        ),
    ];
    for (file, from, to) in edits {
        let path = src.join(file);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        if text.matches(&from).count() != 1 {
            bail!("{}: expected one {from:?} to rename", path.display());
        }
        let mut text = text.replacen(&from, &to, 1);
        if file == "lb-userspace/Cargo.toml" {
            if text.matches("[lib]\n").count() != 1 {
                bail!("{}: expected one [lib] section", path.display());
            }
            text = text.replacen("[lib]\n", "[lib]\nname = \"lb_userspace\"\n", 1);
        }
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
