//! The Kubernetes API as a source: Services and EndpointSlices watched like kube-proxy's
//! informers (same label selector: not another proxy's, not headless), and this node's Node
//! for its zone.
//!
//! Each resource is a kube-rs watcher feeding the [`ApiStore`] (the pure part:
//! [`super::api_store`]); nothing is sent before every resource has been listed once, so a
//! restart never programs a half-seen world. API errors never stop the agent: the last good
//! state keeps serving, the watchers retry with backoff, and the outage shows in the log, in
//! `/healthz` and in the metrics.

use std::{
    sync::{Arc, mpsc},
    time::Duration,
};

use futures::{FutureExt as _, StreamExt as _};
use k8s_openapi::api::{core::v1 as core, discovery::v1 as discovery};
use kube::{
    Api, Client,
    runtime::{WatchStreamExt as _, watcher},
};

pub use super::api_store::ApiStore;
use crate::{health::SourceHealth, metrics::SourceMetrics, model::Update};

/// kube-proxy's selector for Services and EndpointSlices: not handled by another proxy
/// (`service.kubernetes.io/service-proxy-name`), not headless.
pub const LABEL_SELECTOR: &str =
    "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless";

/// An event of one of the watches (boxed: API objects are large).
enum Message {
    Service(Box<Result<watcher::Event<core::Service>, watcher::Error>>),
    Slice(Box<Result<watcher::Event<discovery::EndpointSlice>, watcher::Error>>),
    Node(Box<Result<watcher::Event<core::Node>, watcher::Error>>),
}

/// How often to ask the API server something cheap, to tell when an outage is over (a
/// resumed watch says nothing until an object changes).
const PROBE_EVERY: Duration = Duration::from_secs(5);

/// Runs the source until the syncer goes away.
pub async fn run(
    client: Client,
    node_name: String,
    updates: mpsc::Sender<Update>,
    metrics: SourceMetrics,
    health: Arc<SourceHealth>,
) {
    let config = watcher::Config::default().labels(LABEL_SELECTOR);
    let services = watcher(Api::<core::Service>::all(client.clone()), config.clone())
        .default_backoff()
        .map(|r| Message::Service(Box::new(r)))
        .boxed();
    let slices = watcher(Api::<discovery::EndpointSlice>::all(client.clone()), config)
        .default_backoff()
        .map(|r| Message::Slice(Box::new(r)))
        .boxed();
    let mut store = ApiStore::default();
    let mut streams = vec![services, slices];
    if node_name.is_empty() {
        store.without_node();
    } else {
        let node_config = watcher::Config::default().fields(&format!("metadata.name={node_name}"));
        streams.push(
            watcher(Api::<core::Node>::all(client.clone()), node_config)
                .default_backoff()
                .map(|r| Message::Node(Box::new(r)))
                .boxed(),
        );
    }
    let mut events = futures::stream::select_all(streams);
    let mut probe = tokio::time::interval(PROBE_EVERY);
    let mut node_forbidden = false;
    // The first complete list is sent even when empty: the syncer waits for it.
    let mut changed = true;
    loop {
        let message = tokio::select! {
            message = events.next() => message,
            _ = probe.tick() => {
                if client.apiserver_version().await.is_ok() {
                    recovered(&health, &metrics);
                }
                continue;
            }
        };
        let Some(message) = message else { return };
        let mut handle = |message: Message, store: &mut ApiStore| -> bool {
            let (resource, result) = match message {
                Message::Service(r) => ("services", applied(*r, |e| store.on_service(e))),
                Message::Slice(r) => ("endpointslices", applied(*r, |e| store.on_slice(e))),
                Message::Node(r) => ("nodes", applied(*r, |e| store.on_node(e))),
            };
            match result {
                Ok((changed, answered)) => {
                    metrics
                        .events
                        .get_or_create(&resource_labels(resource))
                        .inc();
                    if answered {
                        recovered(&health, &metrics);
                    }
                    changed
                }
                Err(error) => {
                    metrics
                        .errors
                        .get_or_create(&resource_labels(resource))
                        .inc();
                    metrics.up.set(0);
                    if resource == "nodes" && is_forbidden(&error) {
                        // Without permission to read the Node there is no zone; say it once.
                        if !node_forbidden {
                            tracing::warn!(
                                "cannot read Node {node_name} ({error}); topology hints need its zone and are off"
                            );
                            node_forbidden = true;
                            store.without_node();
                        }
                        return true;
                    }
                    if health.failed() {
                        tracing::warn!(resource, %error, "watching the Kubernetes API failed; serving the last known state and retrying");
                    } else {
                        tracing::debug!(resource, %error, "watch retry failed");
                    }
                    false
                }
            }
        };
        changed |= handle(message, &mut store);
        // Drain what is already there, so a burst becomes one snapshot.
        while let Some(Some(message)) = events.next().now_or_never() {
            changed |= handle(message, &mut store);
        }
        if changed && store.ready() {
            changed = false;
            store.log_rejected();
            let update = Update::Snapshot {
                snapshot: Arc::new(store.snapshot()),
                source_errors: store.rejected(),
            };
            if updates.send(update).is_err() {
                return;
            }
        }
    }
}

/// Applies a watcher result; `(changed, answered)`: whether the store changed, and whether
/// the event proves the API answered (`Init` comes before any request is made).
fn applied<K>(
    result: Result<watcher::Event<K>, watcher::Error>,
    apply: impl FnOnce(watcher::Event<K>) -> bool,
) -> Result<(bool, bool), watcher::Error> {
    result.map(|event| {
        let answered = !matches!(event, watcher::Event::Init);
        (apply(event), answered)
    })
}

fn resource_labels(resource: &'static str) -> crate::metrics::ResourceLabels {
    crate::metrics::ResourceLabels { resource }
}

fn is_forbidden(error: &watcher::Error) -> bool {
    let client_error = match error {
        watcher::Error::InitialListFailed(e)
        | watcher::Error::WatchStartFailed(e)
        | watcher::Error::WatchFailed(e) => e,
        _ => return false,
    };
    matches!(client_error, kube::Error::Api(status) if status.is_forbidden())
}

fn recovered(health: &SourceHealth, metrics: &SourceMetrics) {
    metrics.up.set(1);
    if let Some(after) = health.answered() {
        tracing::info!(after = ?after, "the Kubernetes API answers again");
    }
}
