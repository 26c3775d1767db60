use std::env;

/// Building this crate needs the `bpf-linker` binary, which cargo does not know about: rebuild
/// when it changes (after `cargo xtask setup` installs another one), as aya-template does.
fn main() {
    match which::which("bpf-linker") {
        Ok(path) => println!("cargo:rerun-if-changed={}", path.display()),
        Err(err) => println!(
            "cargo:warning=bpf-linker not found ({err}); run `cargo xtask setup` (PATH={})",
            env::var("PATH").unwrap_or_default()
        ),
    }
}
