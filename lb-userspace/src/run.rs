//! `lb run`: the agent.

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, mpsc},
    time::Duration,
};

use anyhow::{Context as _, bail};

use crate::{
    cli::RunArgs,
    health::Health,
    http,
    kernel::{
        PinLayout,
        attach::{self, Attachment},
        fs,
        maps::Maps,
        object,
    },
    metrics::Metrics,
    model::Node,
    source::{manifests::Manifests, watch},
    sync::{Syncer, Update},
};

fn bind_address(flag: &str, value: &str) -> anyhow::Result<Option<SocketAddr>> {
    if value.is_empty() {
        return Ok(None);
    }
    value
        .parse()
        .map(Some)
        .with_context(|| format!("--{flag} {value:?} is not an address like 0.0.0.0:10256"))
}

fn hostname() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
}

/// `--node-name`, else `$NODE_NAME` (the downward API), else the hostname, as kube-proxy.
fn node_name(flag: Option<&str>) -> String {
    flag.map(str::to_owned)
        .or_else(|| std::env::var("NODE_NAME").ok().filter(|n| !n.is_empty()))
        .or_else(hostname)
        .unwrap_or_default()
}

pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    if !args.xdp_ifaces.is_empty() {
        bail!("--xdp-iface: the XDP/tc NodePort datapath is not implemented in this version of lb");
    }
    if args.manifests.is_empty() {
        bail!(
            "lb run needs --manifests PATH: watching the Kubernetes API (--kubeconfig or in-cluster) is not implemented in this version of lb"
        );
    }
    if args.kubeconfig.is_some() {
        bail!(
            "--kubeconfig: watching the Kubernetes API is not implemented in this version of lb; use --manifests"
        );
    }
    let healthz_addr = bind_address("healthz-bind-address", &args.healthz_bind_address)?;
    let metrics_addr = bind_address("metrics-bind-address", &args.metrics_bind_address)?;
    for path in &args.manifests {
        if !path.exists() {
            bail!("--manifests {}: no such file or directory", path.display());
        }
    }
    let node = Node {
        name: node_name(args.node_name.as_deref()),
        zone: None,
    };
    let cgroup: PathBuf = match args.cgroup {
        Some(dir) => dir,
        None => fs::cgroup2_root()?,
    };
    fs::check_cgroup2(&cgroup)?;
    let layout = PinLayout::new(&args.pin_path);
    fs::ensure_bpffs(layout.root())?;

    // Kernel: check what a previous agent left, load, attach or adopt.
    let adopted_maps = object::check_pinned(&layout)?;
    let mut ebpf = object::load(&layout)?;
    let attachments = attach::attach_or_adopt(&mut ebpf, &layout, &cgroup)?;
    let adopted = attachments
        .iter()
        .filter(|(_, a)| *a == Attachment::Adopted)
        .count();
    let mut maps = Maps::open(&layout)?;
    maps.record_layout_version()?;
    let state = maps.read_state()?;
    tracing::info!(
        cgroup = %cgroup.display(),
        pin_path = %layout.root().display(),
        node = %node.name,
        links_adopted = adopted,
        links_attached = attachments.len() - adopted,
        maps_adopted = adopted_maps,
        frontends_in_kernel = state.frontends().len(),
        "datapath ready"
    );

    let health = Arc::new(Health::new(Duration::from_secs(args.healthz_stale_after)));
    let mut metrics = Metrics::new();
    let stats = Maps::open_stats(&layout)?;
    metrics.register_datapath(stats);
    let metrics = Arc::new(metrics);
    http::start(healthz_addr, metrics_addr, health.clone(), metrics.clone()).await?;

    // Sources and the syncer.
    let (updates_tx, updates) = mpsc::channel();
    let mut manifests = Manifests::new(args.manifests.clone());
    let mut known = BTreeSet::new();
    let (snapshot, source_errors) =
        watch::initial_load(&mut manifests, &mut known, &metrics.manifest_loads);
    let snapshot = Arc::new(snapshot);
    updates_tx
        .send(Update::Snapshot {
            snapshot: snapshot.clone(),
            source_errors,
        })
        .context("starting the syncer")?;
    watch::spawn(
        manifests,
        snapshot,
        known,
        updates_tx.clone(),
        metrics.manifest_loads.clone(),
    )
    .context("starting the manifest watcher")?;
    let syncer = Syncer::new(
        maps,
        state,
        node,
        health,
        metrics,
        Duration::from_secs(args.resync_period.max(1)),
    );
    let sync_thread = std::thread::Builder::new()
        .name("sync".into())
        .spawn(move || syncer.run(&updates))
        .context("starting the syncer")?;

    wait_for_signal().await?;
    tracing::info!("stopping; the datapath stays attached and keeps serving");
    let _syncer_gone = updates_tx.send(Update::Shutdown);
    // The syncer finishes its current pass; the watcher thread ends with the process.
    tokio::task::spawn_blocking(move || sync_thread.join())
        .await
        .context("joining the syncer")?
        .map_err(|_| anyhow::anyhow!("the syncer panicked"))?;
    drop(ebpf);
    Ok(())
}

async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}
