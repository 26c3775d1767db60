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
    health::{Health, SourceHealth, SourceProgress},
    http,
    kernel::{
        PinLayout,
        attach::{self, Attachment},
        ct_forward, fs,
        maps::Maps,
        names::Names,
        object,
        revmap::ReverseMap,
        sock_destroy::{self, SockDestroyer},
        upgrade, xdp,
    },
    metrics::Metrics,
    model::{Node, Update},
    service_health::{self, ServiceHealth},
    source::{kube, manifests::Manifests, watch},
    sync::Syncer,
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
    // First: a SIGTERM during start-up (kubelet stopping a pod that is still starting, a
    // restart right after attachment) is then held until start-up is done and ends the
    // agent cleanly, instead of killing it between two kernel steps by the default action.
    let stop = StopSignals::install()?;
    if !args.manifests.is_empty() && args.kubeconfig.is_some() {
        bail!("--manifests and --kubeconfig: lb reads one source; pass one of them");
    }
    let healthz_addr = bind_address("healthz-bind-address", &args.healthz_bind_address)?;
    let metrics_addr = bind_address("metrics-bind-address", &args.metrics_bind_address)?;
    for path in &args.manifests {
        if !path.exists() {
            bail!("--manifests {}: no such file or directory", path.display());
        }
    }
    // The API client's configuration is checked before anything touches the kernel.
    let kube_client = if args.manifests.is_empty() {
        Some(kube_client(args.kubeconfig.as_deref()).await?)
    } else {
        None
    };
    // --node-ip defaults to the addresses of the --xdp-iface interfaces.
    let node_ips = if args.node_ips.is_empty() && !args.xdp_ifaces.is_empty() {
        xdp::iface_addresses(&args.xdp_ifaces).context("reading the --xdp-iface addresses")?
    } else {
        args.node_ips.clone()
    };
    let node = Node {
        name: node_name(args.node_name.as_deref()),
        zone: None,
        ips: node_ips,
    };
    if node.ips.is_empty() {
        tracing::warn!(
            "no --node-ip: NodePort Services are served on their other addresses only (pass \
             the node's addresses with --node-ip)"
        );
    }
    let cgroup: PathBuf = match args.cgroup {
        Some(dir) => dir,
        None => fs::cgroup2_root()?,
    };
    fs::check_cgroup2(&cgroup)?;
    let layout = PinLayout::new(&args.pin_path);
    fs::ensure_bpffs(layout.root())?;

    // Kernel: check what a previous agent left (the layout version: adopt, upgrade from the
    // previous layout, or refuse), load, attach or adopt. The order of an upgrade's steps
    // around the takeover of the links is kernel/upgrade.rs's (its module docs).
    let capacities = args.capacity.capacities();
    let upgrading = upgrade::prepare(&layout, capacities)?;
    let adopted_maps = object::check_pinned(&layout, capacities)?;
    let ct_forward = ct_forward::before_load(
        &layout,
        matches!(upgrading.decision(), upgrade::Decision::Upgrade { .. }),
    );
    let mut ebpf = object::load(&layout, capacities)?;
    ct_forward.after_load(&layout)?;
    crate::kernel::ebpf_log::start(&mut ebpf);
    upgrading.migrate(&layout, upgrade::Pass::BeforeSwap)?;
    let attachments = attach::attach_or_adopt(&mut ebpf, &layout, &cgroup)?;
    for done in xdp::attach_or_adopt(&mut ebpf, &layout, &args.xdp_ifaces)? {
        tracing::info!(
            iface = %done.iface,
            xdp = ?done.xdp,
            mode = done.mode,
            tc_egress = ?done.tc,
            "north-south datapath attached"
        );
    }
    let adopted = attachments
        .iter()
        .filter(|(_, a)| *a == Attachment::Adopted)
        .count();
    upgrading.migrate(&layout, upgrade::Pass::AfterSwap)?;
    upgrading.remove_unused(&layout)?;
    let mut maps = Maps::open(&layout)?;
    // Only now: a crash before this line leaves the previous version, and the next start
    // carries the upgrade on.
    maps.record_layout_version()?;
    upgrading.finish(&layout)?;
    let maglev_size = match args.lb_algorithm {
        crate::maglev::Algorithm::Random => 0,
        crate::maglev::Algorithm::Maglev => args.maglev_table_size,
    };
    // Before any table of this size is written (tables of another size are rewritten by the
    // first sync; until then a flow may get another backend than its table names).
    maps.record_maglev_table_size(maglev_size)?;
    let state = maps.read_state()?.with_maglev_size(maglev_size);
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

    let source_health = Arc::new(SourceHealth::default());
    let mut health = Health::new(Duration::from_secs(args.healthz_stale_after));
    if kube_client.is_some() {
        health = health.with_source(
            source_health.clone(),
            Duration::from_secs(args.api_stale_after),
        );
    }
    let manifests_progress = SourceProgress::new("manifests");
    if !args.manifests.is_empty() {
        health = health.with_progress(manifests_progress.clone());
    }
    let health = Arc::new(health);
    let mut metrics = Metrics::new();
    let stats = Maps::open_stats(&layout)?;
    metrics.register_datapath(stats);
    metrics.register_map_fill(Maps::open(&layout)?);
    if !args.manifests.is_empty() {
        metrics.register_progress(vec![manifests_progress.clone()], health.stale_after());
    }
    let metrics = Arc::new(metrics);
    http::start(healthz_addr, metrics_addr, health.clone(), metrics.clone()).await?;

    // Sources and the syncer.
    let (updates_tx, updates) = mpsc::channel();
    if let Some(client) = kube_client {
        tracing::info!(node = %node.name, selector = kube::LABEL_SELECTOR, "watching Services and EndpointSlices");
        tokio::spawn(kube::run(
            client,
            node.name.clone(),
            updates_tx.clone(),
            metrics.source.clone(),
            source_health,
        ));
    } else {
        let manifests =
            Manifests::new(args.manifests.clone()).with_node_port_range(args.nodeport_range);
        start_manifests(manifests, &updates_tx, &metrics, manifests_progress)?;
    }
    // Closing sockets of removed backends is best effort: a kernel that cannot do it still
    // gets its Services served.
    let sock_destroyer = SockDestroyer::start(
        &layout,
        sock_destroy::Settings {
            cgroup: cgroup.clone(),
            tcp: args.close_tcp_to_removed_backends,
        },
        metrics.sockets.clone(),
    )
    .map_err(|e| {
        tracing::error!(
            error = format!("{:#}", anyhow::Error::from(e)),
            "sockets connected to removed backends will not be closed"
        );
    })
    .ok();
    // Without the reverse-map thread every TCP connect to a Service writes per-socket state
    // (a slot, or storage): slower, exact all the same.
    let reverse_map = ReverseMap::start(&layout, cgroup.clone(), metrics.reverse_stuck.clone())
        .map_err(|e| {
            tracing::error!(
                error = format!("{:#}", anyhow::Error::from(e)),
                "TCP connects to Services will keep socket storage"
            );
        })
        .ok();
    let service_health = Arc::new(ServiceHealth::default());
    tokio::spawn(service_health::serve(
        service_health.clone(),
        health.clone(),
        node.ips.clone(),
    ));
    let mut syncer = Syncer::new(
        maps,
        state,
        node,
        crate::desired::Limits {
            chunks_per_table: lb_common::maglev::chunks(maglev_size) as usize,
            ..capacities.limits()
        },
        health,
        metrics,
        Duration::from_secs(args.resync_period.max(1)),
    );
    if let Some(destroyer) = sock_destroyer {
        syncer = syncer.with_sock_destroyer(destroyer);
    }
    if let Some(reverse) = reverse_map {
        syncer = syncer.with_reverse_map(reverse);
    }
    syncer = syncer.with_service_health(service_health);
    // Names for inspection are a convenience: without them the datapath serves all the same.
    match Names::open_or_create(&layout, capacities.frontends) {
        Ok(names) => syncer = syncer.with_names(names),
        Err(e) => tracing::error!(
            error = format!("{:#}", anyhow::Error::from(e)),
            "lb list and lb explain will not name Services"
        ),
    }
    let sync_thread = std::thread::Builder::new()
        .name("sync".into())
        .spawn(move || syncer.run(&updates))
        .context("starting the syncer")?;

    stop.wait().await;
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

/// The API client: from `--kubeconfig`, else the in-cluster service account.
async fn kube_client(kubeconfig: Option<&std::path::Path>) -> anyhow::Result<::kube::Client> {
    let config = match kubeconfig {
        Some(path) => {
            let file = ::kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("--kubeconfig {}", path.display()))?;
            ::kube::Config::from_custom_kubeconfig(file, &::kube::config::KubeConfigOptions::default())
                .await
                .with_context(|| format!("--kubeconfig {}", path.display()))?
        }
        None => ::kube::Config::incluster().context(
            "no --manifests or --kubeconfig, and not in a pod: the in-cluster API configuration is missing",
        )?,
    };
    // kube's own retry of 503/429 answers hides an outage for minutes (15 tries, backing off
    // up to 1000 s); the watchers retry with their own backoff, and each failure shows.
    let mut config = config;
    config.default_retry = false;
    ::kube::Client::try_from(config).context("creating the Kubernetes API client")
}

/// Reads the manifests once, hands the snapshot to the syncer and starts watching them.
fn start_manifests(
    mut manifests: Manifests,
    updates: &mpsc::Sender<Update>,
    metrics: &Metrics,
    progress: Arc<SourceProgress>,
) -> anyhow::Result<()> {
    let mut known = BTreeSet::new();
    let (snapshot, source_errors) = watch::initial_load(
        &mut manifests,
        &mut known,
        &metrics.manifest_loads,
        &progress,
    );
    let snapshot = Arc::new(snapshot);
    updates
        .send(Update::Snapshot {
            snapshot: snapshot.clone(),
            source_errors,
        })
        .context("starting the syncer")?;
    watch::spawn(
        manifests,
        snapshot,
        known,
        updates.clone(),
        metrics.manifest_loads.clone(),
        progress,
    )
    .context("starting the manifest watcher")?;
    Ok(())
}

/// SIGTERM and SIGINT, caught from the moment [`StopSignals::install`] returns: one that
/// arrives before [`StopSignals::wait`] is kept and ends the wait at once.
struct StopSignals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl StopSignals {
    fn install() -> anyhow::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            term: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
            int: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
        })
    }

    /// Until SIGTERM or SIGINT (at once if one came since [`StopSignals::install`]).
    async fn wait(mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}
