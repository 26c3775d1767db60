//! `cargo xtask image`: the container image of deploy/Containerfile, built offline: the
//! release binary and exactly the shared libraries `ldd` lists for it, staged in
//! target/image, on an empty base (see the Containerfile for why).

use anyhow::Context as _;

use crate::cmd;

pub fn run(tag: &str) -> anyhow::Result<()> {
    let context = cmd::root().join("target/image");
    let _fresh = std::fs::remove_dir_all(&context);
    std::fs::create_dir_all(&context).with_context(|| format!("creating {}", context.display()))?;
    let files = lb_tests::container::stage_context(&cmd::lb_bin(), &context)?;
    for file in &files {
        eprintln!("image: /{}", file.display());
    }
    lb_tests::container::build_image(&context, tag)?;
    eprintln!(
        "image: built {tag} from {}; `podman save {tag} | ctr -n k8s.io images import -` (or push it) for a node",
        lb_tests::container::containerfile().display()
    );
    Ok(())
}
