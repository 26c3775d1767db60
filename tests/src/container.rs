//! lb's container image and the DaemonSet's pod spec, run with podman the way the kubelet
//! runs them: the image built from `deploy/Containerfile`, and each container's namespaces,
//! capabilities, seccomp profile, volumes and arguments read from `deploy/daemonset.yaml`
//! (never restated here), so that the image, the manifest and the tests cannot drift apart.
//!
//! The image is `FROM scratch`: the release binary and exactly the shared libraries `ldd`
//! lists, staged by [`stage_context`]. Podman runs it with runc, not the default crun:
//! crun 1.8 (Debian 12) refuses hybrid cgroup hosts whose cgroup2 mount still has a
//! controller (`cgroups in hybrid mode not supported, drop all controllers from cgroupv2`),
//! and runc runs there as well as on a pure cgroup v2 node.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::{Command, Output},
};

use serde::Deserialize;

use crate::{TempDir, unique, workspace_root};

/// `deploy/Containerfile`.
pub fn containerfile() -> PathBuf {
    workspace_root().join("deploy/Containerfile")
}

/// `deploy/daemonset.yaml`.
pub fn daemonset_file() -> PathBuf {
    workspace_root().join("deploy/daemonset.yaml")
}

/// Where the binary lives in the image (the Containerfile's ENTRYPOINT).
pub const IMAGE_BINARY: &str = "usr/local/bin/lb";

/// Stages the build context of `deploy/Containerfile` in `dir`: `rootfs/` holding `lb` at
/// [`IMAGE_BINARY`] and every shared library `ldd` lists for it (the dynamic loader
/// included) at its own path. Returns the files staged, relative to `rootfs/`.
pub fn stage_context(lb: &Path, dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    use anyhow::Context as _;
    let rootfs = dir.join("rootfs");
    let mut staged = vec![PathBuf::from(IMAGE_BINARY)];
    let ldd = Command::new("ldd")
        .arg(lb)
        .output()
        .context("running ldd (libc-bin)")?;
    let text = String::from_utf8_lossy(&ldd.stdout);
    if ldd.status.success() {
        staged.extend(
            shared_libraries(&text)
                .into_iter()
                .map(|lib| lib.strip_prefix("/").map(Path::to_path_buf).unwrap_or(lib)),
        );
    } else if !String::from_utf8_lossy(&ldd.stderr).contains("not a dynamic executable")
        && !text.contains("not a dynamic executable")
    {
        anyhow::bail!(
            "ldd {}: {}",
            lb.display(),
            String::from_utf8_lossy(&ldd.stderr)
        );
    }
    for file in &staged {
        let from = if file == Path::new(IMAGE_BINARY) {
            lb.to_owned()
        } else {
            Path::new("/").join(file)
        };
        let to = rootfs.join(file);
        std::fs::create_dir_all(to.parent().context("staged file's directory")?)
            .with_context(|| format!("creating the directory of {}", to.display()))?;
        // fs::copy follows symlinks: the image gets the library under the name the
        // loader asks for.
        std::fs::copy(&from, &to)
            .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    }
    Ok(staged)
}

/// The absolute paths in `ldd` output: `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6
/// (0x...)` and the loader's `/lib64/ld-linux-x86-64.so.2 (0x...)`; the vDSO has none.
pub fn shared_libraries(ldd: &str) -> Vec<PathBuf> {
    ldd.lines()
        .filter_map(|line| {
            let line = line.split(" (0x").next()?;
            let path = line.rsplit("=> ").next()?.trim();
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect()
}

/// Runs a command; its output, or an error with its stderr.
fn run(cmd: &mut Command) -> anyhow::Result<Output> {
    use anyhow::Context as _;
    let out = cmd.output().with_context(|| {
        format!("running {cmd:?} (`cargo xtask setup` installs podman, buildah and runc)")
    })?;
    anyhow::ensure!(
        out.status.success(),
        "{cmd:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    Ok(out)
}

/// Builds `deploy/Containerfile` from the context in `dir` as `tag`, with buildah (no
/// daemon, no registry: the base is `scratch`).
pub fn build_image(dir: &Path, tag: &str) -> anyhow::Result<()> {
    run(Command::new("buildah")
        .args(["build", "--quiet", "--file"])
        .arg(containerfile())
        .args(["--tag", tag])
        .arg(dir))?;
    Ok(())
}

/// An image built for one test, removed on drop (with any container still using it).
pub struct Image {
    pub tag: String,
    /// The files in the image, relative to its root.
    pub files: Vec<PathBuf>,
}

impl Image {
    /// Stages and builds the image of `lb` under a unique tag.
    pub fn build(lb: &Path) -> Self {
        let context = TempDir::new("lbimg");
        let files = stage_context(lb, &context.0).unwrap_or_else(|e| panic!("{e:#}"));
        let image = Self {
            tag: format!("localhost/{}:test", unique("lbimg")),
            files,
        };
        build_image(&context.0, &image.tag).unwrap_or_else(|e| panic!("{e:#}"));
        image
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        let _removed = Command::new("podman")
            .args(["rmi", "--force", &self.tag])
            .output();
    }
}

/// A podman container, removed (killed if running) on drop.
pub struct Container {
    pub name: String,
}

impl Container {
    /// `podman logs` (stdout and stderr together).
    pub fn logs(&self) -> String {
        Command::new("podman")
            .args(["logs", &self.name])
            .output()
            .map(|o| {
                format!(
                    "{}{}",
                    String::from_utf8_lossy(&o.stdout),
                    String::from_utf8_lossy(&o.stderr)
                )
            })
            .unwrap_or_default()
    }

    /// Whether the container is running.
    pub fn running(&self) -> bool {
        Command::new("podman")
            .args(["inspect", "--format", "{{.State.Running}}", &self.name])
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "true")
    }

    /// `podman stop` (SIGTERM, then SIGKILL after `grace` seconds); returns the exit code.
    pub fn stop(&self, grace: u32) -> Option<i32> {
        run(Command::new("podman").args(["stop", "--time", &grace.to_string(), &self.name]))
            .unwrap_or_else(|e| panic!("{e:#}"));
        let out = run(Command::new("podman").args([
            "inspect",
            "--format",
            "{{.State.ExitCode}}",
            &self.name,
        ]))
        .unwrap_or_else(|e| panic!("{e:#}"));
        String::from_utf8_lossy(&out.stdout).trim().parse().ok()
    }

    /// `podman exec NAME ARGS...` (the image's binary is the first argument).
    pub fn exec(&self, args: &[&str]) -> Output {
        Command::new("podman")
            .args(["exec", &self.name])
            .args(args)
            .output()
            .expect("podman exec")
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _removed = Command::new("podman")
            .args(["rm", "--force", "--time", "0", &self.name])
            .output();
    }
}

/// `deploy/daemonset.yaml`, the parts that decide how a container runs on the node.
#[derive(Debug, Deserialize)]
pub struct DaemonSet {
    pub spec: DaemonSetSpec,
}

#[derive(Debug, Deserialize)]
pub struct DaemonSetSpec {
    pub template: PodTemplate,
}

#[derive(Debug, Deserialize)]
pub struct PodTemplate {
    pub spec: PodSpec,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodSpec {
    #[serde(default)]
    pub host_network: bool,
    #[serde(default, rename = "hostPID")]
    pub host_pid: bool,
    #[serde(default)]
    pub init_containers: Vec<ContainerSpec>,
    pub containers: Vec<ContainerSpec>,
    #[serde(default)]
    pub volumes: Vec<Volume>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerSpec {
    pub name: String,
    /// Replaces the image's ENTRYPOINT when set.
    #[serde(default)]
    pub command: Vec<String>,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub env: Vec<EnvVar>,
    #[serde(default)]
    pub security_context: SecurityContext,
    #[serde(default)]
    pub volume_mounts: Vec<VolumeMount>,
    pub liveness_probe: Option<Probe>,
    pub readiness_probe: Option<Probe>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EnvVar {
    pub name: String,
    pub value: Option<String>,
    pub value_from: Option<EnvVarSource>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EnvVarSource {
    pub field_ref: Option<FieldRef>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FieldRef {
    pub field_path: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SecurityContext {
    #[serde(default)]
    pub privileged: bool,
    #[serde(default)]
    pub capabilities: Capabilities,
    pub seccomp_profile: Option<SeccompProfile>,
}

#[derive(Debug, Default, Deserialize)]
pub struct Capabilities {
    #[serde(default)]
    pub add: Vec<String>,
    #[serde(default)]
    pub drop: Vec<String>,
}

#[derive(Debug, Deserialize)]
pub struct SeccompProfile {
    #[serde(rename = "type")]
    pub kind: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VolumeMount {
    pub name: String,
    pub mount_path: String,
    pub mount_propagation: Option<String>,
    #[serde(default)]
    pub read_only: bool,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Volume {
    pub name: String,
    pub host_path: Option<HostPath>,
}

#[derive(Debug, Deserialize)]
pub struct HostPath {
    pub path: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Probe {
    pub http_get: Option<HttpGet>,
}

#[derive(Debug, Deserialize)]
pub struct HttpGet {
    pub path: String,
}

impl DaemonSet {
    /// Reads and parses `deploy/daemonset.yaml`.
    pub fn load() -> Self {
        let path = daemonset_file();
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        serde_saphyr::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    pub fn pod(&self) -> &PodSpec {
        &self.spec.template.spec
    }
}

impl PodSpec {
    /// The container (or init container) called `name`.
    pub fn container(&self, name: &str) -> &ContainerSpec {
        self.containers
            .iter()
            .chain(&self.init_containers)
            .find(|c| c.name == name)
            .unwrap_or_else(|| panic!("no container {name} in the DaemonSet"))
    }

    /// The hostPath of the volume mounted at `mount_path` in `container`.
    pub fn host_path_at(&self, container: &ContainerSpec, mount_path: &str) -> &str {
        let mount = container
            .volume_mounts
            .iter()
            .find(|m| m.mount_path == mount_path)
            .unwrap_or_else(|| panic!("{} mounts nothing at {mount_path}", container.name));
        self.volume_host_path(&mount.name)
    }

    fn volume_host_path(&self, name: &str) -> &str {
        self.volumes
            .iter()
            .find(|v| v.name == name)
            .and_then(|v| v.host_path.as_ref())
            .map(|h| h.path.as_str())
            .unwrap_or_else(|| panic!("volume {name} is not a hostPath volume"))
    }

    /// `podman run` options that give `container` what the kubelet would: the pod's host
    /// namespaces, the container's security context, its hostPath volumes (each host path
    /// passed through `host_path`, for a node whose layout differs, e.g. cgroup2 at
    /// /sys/fs/cgroup/unified), its environment (`field_refs` answers the downward API:
    /// fieldPath -> value) and its command. Arguments follow the image.
    pub fn podman_options(
        &self,
        container: &ContainerSpec,
        host_path: &dyn Fn(&str) -> PathBuf,
        field_refs: &BTreeMap<&str, String>,
    ) -> Vec<String> {
        let mut opts = Vec::new();
        if self.host_network {
            opts.push("--network=host".to_owned());
        }
        if self.host_pid {
            opts.push("--pid=host".to_owned());
        }
        let sc = &container.security_context;
        if sc.privileged {
            opts.push("--privileged".to_owned());
        }
        for cap in &sc.capabilities.drop {
            opts.push(format!("--cap-drop={}", capability(cap)));
        }
        for cap in &sc.capabilities.add {
            opts.push(format!("--cap-add={}", capability(cap)));
        }
        match sc.seccomp_profile.as_ref().map(|p| p.kind.as_str()) {
            Some("Unconfined") => opts.push("--security-opt=seccomp=unconfined".to_owned()),
            // RuntimeDefault, or unset (the kubelet's default is the runtime's): podman's.
            Some("RuntimeDefault") | None => {}
            Some(other) => panic!("seccompProfile type {other} is not handled here"),
        }
        for mount in &container.volume_mounts {
            let host = host_path(self.volume_host_path(&mount.name));
            // Kubernetes' propagation modes, as the kubelet hands them to the runtime.
            let propagation = match mount.mount_propagation.as_deref() {
                Some("HostToContainer") => "rslave",
                Some("Bidirectional") => "rshared",
                Some("None") | None => "rprivate",
                Some(other) => panic!("mountPropagation {other}?"),
            };
            let ro = if mount.read_only { ",ro" } else { "" };
            opts.push(format!(
                "--volume={}:{}:{propagation}{ro}",
                host.display(),
                mount.mount_path
            ));
        }
        for (name, value) in container.environment(field_refs) {
            opts.push(format!("--env={name}={value}"));
        }
        if !container.command.is_empty() {
            opts.push(format!(
                "--entrypoint={}",
                serde_json::to_string(&container.command).expect("json")
            ));
        }
        opts
    }
}

/// Kubernetes names capabilities without the `CAP_` prefix; podman takes either.
fn capability(name: &str) -> String {
    if name == "ALL" || name.starts_with("CAP_") {
        name.to_owned()
    } else {
        format!("CAP_{name}")
    }
}

impl ContainerSpec {
    /// The container's environment: literal values and downward-API fields from
    /// `field_refs` (fieldPath -> value).
    pub fn environment(&self, field_refs: &BTreeMap<&str, String>) -> Vec<(String, String)> {
        self.env
            .iter()
            .map(|var| {
                let value = var.value.clone().unwrap_or_else(|| {
                    let path = var
                        .value_from
                        .as_ref()
                        .and_then(|f| f.field_ref.as_ref())
                        .map(|f| f.field_path.as_str())
                        .unwrap_or_else(|| panic!("env {}: no value, no fieldRef", var.name));
                    field_refs
                        .get(path)
                        .cloned()
                        .unwrap_or_else(|| panic!("env {}: no value for {path}", var.name))
                });
                (var.name.clone(), value)
            })
            .collect()
    }

    /// The arguments with `$(VAR)` expanded from the environment, as the kubelet does.
    pub fn expanded_args(&self, field_refs: &BTreeMap<&str, String>) -> Vec<String> {
        let env = self.environment(field_refs);
        self.args
            .iter()
            .map(|arg| {
                env.iter().fold(arg.clone(), |arg, (name, value)| {
                    arg.replace(&format!("$({name})"), value)
                })
            })
            .collect()
    }
}

/// The value of `--flag=VALUE` or `--flag VALUE` in `args`.
pub fn flag_value<'a>(args: &'a [String], flag: &str) -> Option<&'a str> {
    let eq = format!("{flag}=");
    args.iter().enumerate().find_map(|(i, a)| {
        a.strip_prefix(&eq).or_else(|| {
            (a == flag)
                .then(|| args.get(i + 1).map(String::as_str))
                .flatten()
        })
    })
}

/// `args` with `--flag`'s value replaced by `value` (appended when absent).
pub fn with_flag(args: &[String], flag: &str, value: &str) -> Vec<String> {
    let eq = format!("{flag}=");
    let mut out = Vec::with_capacity(args.len() + 1);
    let mut replaced = false;
    let mut iter = args.iter();
    while let Some(a) = iter.next() {
        if a.starts_with(&eq) {
            out.push(format!("{flag}={value}"));
            replaced = true;
        } else if a == flag {
            let _old = iter.next();
            out.push(format!("{flag}={value}"));
            replaced = true;
        } else {
            out.push(a.clone());
        }
    }
    if !replaced {
        out.push(format!("{flag}={value}"));
    }
    out
}

/// Options every `podman run` here needs on any host, beyond what the manifest says.
///
/// - `--runtime=runc`: see the module docs (crun refuses hybrid cgroup hosts).
/// - `--ulimit`: podman 4.3 asks the runtime for 1048576 open files and processes whatever
///   its own hard limits are (it lowers its own process limit to 32768 first), and the
///   runtime, without CAP_SYS_RESOURCE in a sandboxed host, cannot raise them: the
///   container gets this process's hard limits instead (newer podman caps its defaults so).
pub fn podman_host_options() -> Vec<String> {
    let hard = |resource| {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes into a live rlimit.
        let rc = unsafe { libc::getrlimit(resource, &raw mut lim) };
        assert_eq!(rc, 0, "getrlimit");
        lim.rlim_max
    };
    let nofile = hard(libc::RLIMIT_NOFILE).min(1 << 20);
    let nproc = hard(libc::RLIMIT_NPROC).min(32_768);
    vec![
        "--runtime=runc".to_owned(),
        format!("--ulimit=nofile={nofile}:{nofile}"),
        format!("--ulimit=nproc={nproc}:{nproc}"),
    ]
}

/// `podman run --rm OPTS IMAGE ARGS` in the foreground: its output.
pub fn run_once(options: &[String], image: &Image, args: &[String]) -> Output {
    Command::new("podman")
        .args(["run", "--rm"])
        .args(podman_host_options())
        .args(options)
        .arg(&image.tag)
        .args(args)
        .output()
        .expect("podman run")
}

/// `podman run --detach` under a unique name; the container is removed on drop.
pub fn start(options: &[String], image: &Image, args: &[String]) -> Container {
    let container = Container {
        name: unique("lbctr"),
    };
    run(Command::new("podman")
        .args(["run", "--detach", "--name", &container.name])
        .args(podman_host_options())
        .args(options)
        .arg(&image.tag)
        .args(args))
    .unwrap_or_else(|e| panic!("{e:#}"));
    container
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_paths() {
        let out = "\tlinux-vdso.so.1 (0x00007ffd)\n\tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f8e)\n\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f8e)\n\t/lib64/ld-linux-x86-64.so.2 (0x00007f8e)\n";
        assert_eq!(
            shared_libraries(out),
            [
                "/lib/x86_64-linux-gnu/libgcc_s.so.1",
                "/lib/x86_64-linux-gnu/libc.so.6",
                "/lib64/ld-linux-x86-64.so.2"
            ]
            .map(PathBuf::from)
        );
    }

    #[test]
    fn flags() {
        let args: Vec<String> = ["run", "--cgroup=/a", "--pin-path", "/b"]
            .map(String::from)
            .to_vec();
        assert_eq!(flag_value(&args, "--cgroup"), Some("/a"));
        assert_eq!(flag_value(&args, "--pin-path"), Some("/b"));
        assert_eq!(flag_value(&args, "--node-ip"), None);
        assert_eq!(
            with_flag(&with_flag(&args, "--pin-path", "/c"), "--x", "1"),
            ["run", "--cgroup=/a", "--pin-path=/c", "--x=1"]
        );
    }

    #[test]
    fn the_daemonset_parses() {
        let ds = DaemonSet::load();
        let lb = ds.pod().container("lb");
        assert!(!lb.args.is_empty());
        assert!(lb.readiness_probe.is_some());
    }
}
