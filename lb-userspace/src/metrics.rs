//! `/metrics`: the agent's Prometheus metrics, plus the datapath counters read from the
//! kernel (`LB_STATS`) at scrape time.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
};

use crate::{
    health::SourceProgress,
    kernel::maps::{Fill, Maps},
};

use aya::maps::{MapData, PerCpuArray};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric as _},
    metrics::{
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::{ConstGauge, Gauge},
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

/// Resource label of the API source's metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResourceLabels {
    pub resource: &'static str,
}

/// The Kubernetes API source (shared with its task).
#[derive(Clone, Debug, Default)]
pub struct SourceMetrics {
    /// 1 while the API answers.
    pub up: Gauge,
    pub events: Family<ResourceLabels, Counter>,
    pub errors: Family<ResourceLabels, Counter>,
}

/// Result label of `lb_syncs_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SyncLabels {
    pub result: &'static str,
}

/// Protocol label of `lb_sockets_destroyed_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SockLabels {
    pub proto: &'static str,
}

/// Reason label of `lb_socket_destroy_failures_total`: `netns` (a namespace could not be
/// entered), `dump`, `destroy`, `deadline` (a namespace not reached within the pass's budget).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SockFailureLabels {
    pub reason: &'static str,
}

/// Closing the sockets connected to removed backends (shared with its thread).
#[derive(Clone, Debug, Default)]
pub struct SockMetrics {
    pub destroyed: Family<SockLabels, Counter>,
    pub failures: Family<SockFailureLabels, Counter>,
    /// Seconds the last pass took.
    pub pass_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
}

/// Everything the agent reports.
#[derive(Debug)]
pub struct Metrics {
    pub registry: Registry,
    /// Load-balanced Services programmed.
    pub services: Gauge,
    /// Frontends (Service IP, port, protocol) in the kernel.
    pub frontends: Gauge,
    /// Backend slots in the kernel.
    pub backends: Gauge,
    pub syncs: Family<SyncLabels, Counter>,
    pub sync_duration: Histogram,
    pub map_writes: Counter,
    /// Objects or Services currently rejected (bad manifests, conflicts, full maps).
    pub config_errors: Gauge,
    /// Unix time of the last complete sync.
    pub last_sync: Gauge<f64, std::sync::atomic::AtomicU64>,
    /// Services added, changed or removed in what the sources hand over (kube-proxy's
    /// `kubeproxy_sync_proxy_rules_service_changes_total`; see [`crate::changes`]).
    pub service_changes: Counter,
    /// EndpointSlices added, changed or removed (kube-proxy's
    /// `kubeproxy_sync_proxy_rules_endpoint_changes_total`).
    pub endpoint_changes: Counter,
    /// From an EndpointSlice's `endpoints.kubernetes.io/last-change-trigger-time` to the
    /// pass that wrote it (kube-proxy's `kubeproxy_network_programming_duration_seconds`).
    pub network_programming: Histogram,
    /// Reads of the manifests.
    pub manifest_loads: ManifestLoads,
    pub source: SourceMetrics,
    pub sockets: SockMetrics,
    /// `LB_REVERSE` entries left pending or draining because a socket of their backend
    /// could not be given its storage (set by the reverse-map thread).
    pub reverse_stuck: Gauge,
    /// How full each map is (see [`Metrics::register_map_fill`]).
    pub map_fill: Arc<MapFill>,
}

/// How often and how long the manifests were read (shared with the watcher thread).
#[derive(Clone, Debug, Default)]
pub struct ManifestLoads {
    /// Seconds the last read took (changed files parsed and validated, the rest stat'ed).
    pub seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
    pub total: Counter,
}

impl ManifestLoads {
    pub fn record(&self, took: std::time::Duration) {
        self.seconds.set(took.as_secs_f64());
        self.total.inc();
    }
}

/// kube-proxy's buckets for the network programming latency (pkg/proxy/metrics): 0, 0.25 s,
/// 0.5 s, every second to 59 s, every 5 s to 115 s, every 30 s to 5 min, so that its
/// dashboards' quantiles read the same on lb's histogram.
fn network_programming_buckets() -> Vec<f64> {
    let mut buckets = vec![0.0, 0.25, 0.5];
    buckets.extend((1..60).map(f64::from));
    buckets.extend((0..12).map(|i| 60.0 + 5.0 * f64::from(i)));
    buckets.extend((0..7).map(|i| 120.0 + 30.0 * f64::from(i)));
    buckets
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("lb");
        let services = Gauge::default();
        let frontends = Gauge::default();
        let backends = Gauge::default();
        let syncs = Family::<SyncLabels, Counter>::default();
        // 100 µs .. ~13 s
        let sync_duration = Histogram::new(exponential_buckets(0.0001, 2.0, 18));
        let map_writes = Counter::default();
        let config_errors = Gauge::default();
        let last_sync = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        let service_changes = Counter::default();
        let endpoint_changes = Counter::default();
        let network_programming = Histogram::new(network_programming_buckets());
        let manifest_loads = ManifestLoads::default();
        let source = SourceMetrics::default();
        let sockets = SockMetrics::default();
        let reverse_stuck = Gauge::default();
        registry.register(
            "services",
            "Load-balanced Services programmed in the kernel",
            services.clone(),
        );
        registry.register(
            "frontends",
            "Service frontends (IP, port, protocol) in the kernel",
            frontends.clone(),
        );
        registry.register(
            "backends",
            "Backend slots in the kernel, over all frontends",
            backends.clone(),
        );
        registry.register(
            "syncs",
            "Syncs of the desired state into the kernel, by result",
            syncs.clone(),
        );
        registry.register(
            "sync_duration_seconds",
            "Time from a change to its writes being in the kernel",
            sync_duration.clone(),
        );
        registry.register(
            "map_writes",
            "BPF map updates and deletes made by syncs",
            map_writes.clone(),
        );
        registry.register(
            "config_errors",
            "Objects or Services currently rejected (see the log)",
            config_errors.clone(),
        );
        registry.register(
            "last_sync_timestamp_seconds",
            "Unix time of the last complete sync",
            last_sync.clone(),
        );
        registry.register(
            "service_changes",
            "Services added, changed or removed in what the sources hand over",
            service_changes.clone(),
        );
        registry.register(
            "endpoint_changes",
            "EndpointSlices (and v1 Endpoints subsets) added, changed or removed in what the sources hand over",
            endpoint_changes.clone(),
        );
        registry.register(
            "network_programming_duration_seconds",
            "From an EndpointSlice's last-change-trigger-time annotation to the sync pass that wrote the change",
            network_programming.clone(),
        );
        registry.register(
            "manifest_load_seconds",
            "Seconds the last read of the manifests took",
            manifest_loads.seconds.clone(),
        );
        registry.register(
            "manifest_loads",
            "Reads of the manifests (at start and after each change)",
            manifest_loads.total.clone(),
        );
        registry.register(
            "source_up",
            "1 while the Kubernetes API answers (API source only)",
            source.up.clone(),
        );
        registry.register(
            "source_events",
            "Watch events received from the Kubernetes API, by resource",
            source.events.clone(),
        );
        registry.register(
            "source_errors",
            "Errors watching the Kubernetes API, by resource (each retried)",
            source.errors.clone(),
        );
        registry.register(
            "sockets_destroyed",
            "Sockets lb connected to a backend that left its Service, closed, by protocol",
            sockets.destroyed.clone(),
        );
        registry.register(
            "socket_destroy_failures",
            "Failures closing sockets of removed backends, by reason (see the log)",
            sockets.failures.clone(),
        );
        registry.register(
            "socket_destroy_pass_seconds",
            "Seconds the last pass closing sockets of removed backends took",
            sockets.pass_seconds.clone(),
        );
        registry.register(
            "reverse_entries_stuck",
            "LB_REVERSE entries kept pending or draining because a socket to their backend could not be given its storage (retried; see the log)",
            reverse_stuck.clone(),
        );
        Self {
            registry,
            services,
            frontends,
            backends,
            syncs,
            sync_duration,
            map_writes,
            config_errors,
            last_sync,
            service_changes,
            endpoint_changes,
            network_programming,
            manifest_loads,
            source,
            sockets,
            reverse_stuck,
            map_fill: Arc::new(MapFill::default()),
        }
    }

    /// Adds `lb_map_entries{map}`, `lb_map_capacity{map}`, `lb_map_fill_ratio{map}` and
    /// `lb_map_nearly_full{map}` for every map with a capacity. `maps` is a handle of the
    /// scrape's own: the programs' LRU maps are counted (by iteration) at each scrape; the
    /// maps the agent writes are set by the syncer after each pass ([`MapFill::set`]).
    pub fn register_map_fill(&mut self, maps: Maps) {
        for fill in maps.fill() {
            self.map_fill.add(fill);
        }
        self.registry.register_collector(Box::new(MapFillCollector {
            fill: self.map_fill.clone(),
            maps: Mutex::new(maps),
        }));
    }

    /// Adds the datapath counters, read from `stats` at every scrape.
    pub fn register_datapath(&mut self, stats: PerCpuArray<MapData, u64>) {
        self.registry
            .register_collector(Box::new(DatapathCollector {
                stats: Mutex::new(stats),
            }));
    }
}

/// Adds, per source, `lb_source_busy_seconds{source}` (how long its current piece of work
/// has taken; 0 when idle) and `lb_source_stalled{source}` (1 while that exceeds
/// `stale_after`: the source is stuck and `/healthz` fails), read at every scrape.
impl Metrics {
    pub fn register_progress(
        &mut self,
        sources: Vec<Arc<SourceProgress>>,
        stale_after: std::time::Duration,
    ) {
        self.registry
            .register_collector(Box::new(ProgressCollector {
                sources,
                stale_after,
            }));
    }
}

#[derive(Debug)]
struct ProgressCollector {
    sources: Vec<Arc<SourceProgress>>,
    stale_after: std::time::Duration,
}

impl Collector for ProgressCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let busy: Vec<(&'static str, std::time::Duration)> = self
            .sources
            .iter()
            .map(|s| (s.name(), s.busy_for().unwrap_or_default()))
            .collect();
        let mut family = encoder.encode_descriptor(
            "source_busy_seconds",
            "Seconds the source's current piece of work (reading changed manifests) has taken; 0 when idle",
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        for (name, took) in &busy {
            ConstGauge::new(took.as_secs_f64())
                .encode(family.encode_family(&[("source", *name)])?)?;
        }
        let mut family = encoder.encode_descriptor(
            "source_stalled",
            "1 while the source has been busy with one piece of work for longer than --healthz-stale-after",
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        for (name, took) in &busy {
            ConstGauge::new(i64::from(*took >= self.stale_after))
                .encode(family.encode_family(&[("source", *name)])?)?;
        }
        Ok(())
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Reads `LB_STATS` at scrape time.
struct DatapathCollector {
    stats: Mutex<PerCpuArray<MapData, u64>>,
}

impl std::fmt::Debug for DatapathCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DatapathCollector")
    }
}

impl Collector for DatapathCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let stats = self
            .stats
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut family = encoder.encode_descriptor(
            "datapath_events",
            "What the socket programs did, by event (see lb-common/src/stats.rs)",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        for (i, name) in (0u32..).zip(lb_common::stats::NAMES) {
            // A failed read (map gone during cleanup) leaves the event out of this scrape.
            let Ok(per_cpu) = stats.get(&i, 0) else {
                continue;
            };
            let total: u64 = per_cpu.iter().sum();
            let labels = [("event", name)];
            ConstCounter::new(total).encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

/// A map is "nearly full" above this share of its capacity: `lb_map_nearly_full` is 1 and a
/// warning is logged. An agent-written map that is full refuses the Services that do not fit;
/// a full LRU map (affinity, unconnected UDP flows) evicts the oldest entries of live clients.
pub const NEARLY_FULL: f64 = 0.9;

/// Whether a map at `ratio` is nearly full, given whether it `was`: `Some(now)` when that
/// changes.
fn crossing(was: bool, ratio: f64) -> Option<bool> {
    let now = ratio > NEARLY_FULL;
    (now != was).then_some(now)
}

/// How full each map is, shared by the syncer (the maps it writes, after every pass) and the
/// scrape (the programs' LRU maps, counted then). Logs once when a map passes
/// [`NEARLY_FULL`] and once when it is back below.
#[derive(Debug, Default)]
pub struct MapFill {
    maps: Mutex<BTreeMap<&'static str, (Fill, bool)>>,
}

impl MapFill {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<&'static str, (Fill, bool)>> {
        self.maps
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Starts tracking a map at `fill`.
    fn add(&self, fill: Fill) {
        self.lock().insert(fill.map, (fill, false));
        self.set(fill.map, fill.entries);
    }

    /// Records that `map` holds `entries`; a map not added is ignored.
    pub fn set(&self, map: &'static str, entries: usize) {
        let mut maps = self.lock();
        let Some((fill, nearly_full)) = maps.get_mut(map) else {
            return;
        };
        fill.entries = entries;
        match crossing(*nearly_full, fill.ratio()) {
            Some(true) => tracing::warn!(
                map,
                entries,
                capacity = fill.capacity,
                percent = (fill.ratio() * 100.0).round(),
                threshold_percent = NEARLY_FULL * 100.0,
                "map nearly full"
            ),
            Some(false) => tracing::info!(
                map,
                entries,
                capacity = fill.capacity,
                "map no longer nearly full"
            ),
            None => {}
        }
        *nearly_full = fill.ratio() > NEARLY_FULL;
    }

    /// Every tracked map and whether it is nearly full.
    pub fn fills(&self) -> Vec<(Fill, bool)> {
        self.lock().values().copied().collect()
    }
}

/// Counts the LRU maps at scrape time and encodes every map's fill.
struct MapFillCollector {
    fill: Arc<MapFill>,
    maps: Mutex<Maps>,
}

impl std::fmt::Debug for MapFillCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MapFillCollector")
    }
}

impl Collector for MapFillCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let sizes = self
            .maps
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .conn_table_sizes();
        self.fill.set(lb_common::maps::AFFINITY, sizes.affinity);
        self.fill.set(lb_common::maps::REVNAT, sizes.revnat);
        self.fill.set(lb_common::maps::UDP_FLOWS, sizes.udp_flows);
        self.fill.set(lb_common::maps::UDP_SOCKS, sizes.udp_socks);
        self.fill.set(lb_common::maps::TCP_SOCKS, sizes.tcp_socks);
        self.fill.set(lb_common::nat::CT, sizes.ct);
        self.fill.set(lb_common::nat::CT4, sizes.ct4);
        let fills = self.fill.fills();
        let gauge = prometheus_client::metrics::MetricType::Gauge;
        let mut family =
            encoder.encode_descriptor("map_entries", "Entries in the map", None, gauge)?;
        for (fill, _) in &fills {
            let entries = i64::try_from(fill.entries).unwrap_or(i64::MAX);
            ConstGauge::new(entries).encode(family.encode_family(&[("map", fill.map)])?)?;
        }
        let mut family = encoder.encode_descriptor(
            "map_capacity",
            "Capacity of the map (max_entries)",
            None,
            gauge,
        )?;
        for (fill, _) in &fills {
            ConstGauge::new(i64::from(fill.capacity))
                .encode(family.encode_family(&[("map", fill.map)])?)?;
        }
        let mut family = encoder.encode_descriptor(
            "map_fill_ratio",
            "Entries over capacity of the map",
            None,
            gauge,
        )?;
        for (fill, _) in &fills {
            ConstGauge::new(fill.ratio()).encode(family.encode_family(&[("map", fill.map)])?)?;
        }
        let mut family = encoder.encode_descriptor(
            "map_nearly_full",
            "1 while the map holds more than 90% of its capacity",
            None,
            gauge,
        )?;
        for (fill, nearly_full) in &fills {
            ConstGauge::new(i64::from(*nearly_full))
                .encode(family.encode_family(&[("map", fill.map)])?)?;
        }
        Ok(())
    }
}

/// Renders the registry in the Prometheus text format.
pub fn render(metrics: &Metrics) -> Result<String, std::fmt::Error> {
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &metrics.registry)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use rstest::rstest;

    use super::*;

    #[rstest]
    #[case::empty(false, 0.0, None)]
    #[case::at_the_threshold_not_yet(false, 0.9, None)]
    #[case::passes(false, 0.91, Some(true))]
    #[case::stays(true, 1.0, None)]
    #[case::back_at_the_threshold(true, 0.9, Some(false))]
    #[case::back_below(true, 0.5, Some(false))]
    fn nearly_full_crossings(#[case] was: bool, #[case] ratio: f64, #[case] want: Option<bool>) {
        assert_eq!(crossing(was, ratio), want);
    }

    #[rstest]
    #[case::no_capacity(3, 0, 0.0)]
    #[case::empty(0, 4, 0.0)]
    #[case::three_of_four(3, 4, 0.75)]
    #[case::full(4, 4, 1.0)]
    fn fill_ratio(#[case] entries: usize, #[case] capacity: u32, #[case] want: f64) {
        let fill = Fill {
            map: "LB_FRONTENDS",
            entries,
            capacity,
        };
        assert!((fill.ratio() - want).abs() < 1e-9, "{}", fill.ratio());
    }

    #[test]
    fn map_fill_tracks_added_maps_only() {
        let fill = MapFill::default();
        fill.set("LB_FRONTENDS", 3);
        assert!(fill.fills().is_empty(), "not added: ignored");
        fill.add(Fill {
            map: "LB_FRONTENDS",
            entries: 0,
            capacity: 4,
        });
        fill.set("LB_FRONTENDS", 4);
        assert_eq!(
            fill.fills(),
            vec![(
                Fill {
                    map: "LB_FRONTENDS",
                    entries: 4,
                    capacity: 4
                },
                true
            )]
        );
        fill.set("LB_FRONTENDS", 1);
        assert!(!fill.fills()[0].1);
    }
}
