//! `healthCheckNodePort`: kube-proxy's per-Service health check server
//! (pkg/proxy/healthcheck/service_health.go). A LoadBalancer Service with
//! `externalTrafficPolicy: Local` gets a port on which every node answers whether it has a
//! local endpoint, so the cloud load balancer sends traffic only to nodes that can serve it:
//! 200 with local endpoints, 503 without, and kube-proxy's JSON body and headers either way.
//!
//! The syncer keeps the counts current after every pass (so an endpoint change shows at the
//! next request); a task of its own opens and closes the listeners as Services come and go,
//! on every `--node-ip` (all addresses when there is none, as kube-proxy without
//! `--nodeport-addresses`).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::{Arc, Mutex},
};

use axum::{
    Router,
    extract::State,
    http::{HeaderValue, StatusCode},
    response::{IntoResponse, Response},
};
use tokio::sync::watch;

use crate::{
    desired,
    health::Health,
    model::{Node, ObjectKey, Snapshot},
};

/// One Service's health check: its port and how many ready endpoints this node has.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthCheck {
    pub service: ObjectKey,
    pub port: u16,
    pub local_endpoints: usize,
}

/// The health checks, by Service; shared by the syncer (writer) and the servers (readers).
#[derive(Debug)]
pub struct ServiceHealth {
    checks: Mutex<BTreeMap<ObjectKey, HealthCheck>>,
    ports: watch::Sender<BTreeSet<u16>>,
}

impl Default for ServiceHealth {
    fn default() -> Self {
        Self {
            checks: Mutex::new(BTreeMap::new()),
            ports: watch::Sender::new(BTreeSet::new()),
        }
    }
}

impl ServiceHealth {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<ObjectKey, HealthCheck>> {
        // Plain data: a panic while holding the lock cannot leave it inconsistent.
        self.checks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Recomputes the health checks of the `touched` Services of `snapshot` (all of them on
    /// the first call), in proportion to what changed.
    pub fn update<'a>(
        &self,
        snapshot: &Snapshot,
        touched: impl IntoIterator<Item = &'a ObjectKey>,
        node: &Node,
    ) {
        let mut checks = self.lock();
        for key in touched {
            let check = snapshot.services.get(key).and_then(|service| {
                Some(HealthCheck {
                    service: key.clone(),
                    port: service.health_check_node_port?,
                    local_endpoints: desired::local_ready_endpoints(
                        service,
                        snapshot.slices_of(key),
                        node,
                    ),
                })
            });
            match check {
                Some(check) => {
                    checks.insert(key.clone(), check);
                }
                None => {
                    checks.remove(key);
                }
            }
        }
        let ports: BTreeSet<u16> = checks.values().map(|c| c.port).collect();
        self.ports.send_if_modified(|current| {
            let changed = *current != ports;
            *current = ports;
            changed
        });
    }

    /// The health check on `port`, if a Service has it.
    pub fn on_port(&self, port: u16) -> Option<HealthCheck> {
        self.lock().values().find(|c| c.port == port).cloned()
    }
}

/// kube-proxy's answer for one health check: the status code, headers and JSON body.
fn answer(check: Option<&HealthCheck>, proxy_healthy: bool) -> Response {
    let Some(check) = check else {
        return (StatusCode::NOT_FOUND, "no Service on this port").into_response();
    };
    let count = check.local_endpoints;
    let body = serde_json::json!({
        "service": {"namespace": check.service.namespace, "name": check.service.name},
        "localEndpoints": count,
        "serviceProxyHealthy": proxy_healthy,
    })
    .to_string();
    let status = if count > 0 {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let mut response = (status, body).into_response();
    let headers = response.headers_mut();
    headers.insert("content-type", HeaderValue::from_static("application/json"));
    headers.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        "x-load-balancing-endpoint-weight",
        HeaderValue::from(u64::try_from(count).unwrap_or(u64::MAX)),
    );
    response
}

/// What a listener's handler needs.
#[derive(Clone)]
struct Port {
    port: u16,
    checks: Arc<ServiceHealth>,
    proxy: Arc<Health>,
}

async fn handle(State(p): State<Port>) -> Response {
    answer(p.checks.on_port(p.port).as_ref(), p.proxy.report().healthy)
}

/// Opens and closes the health check listeners as the set of ports changes, until the
/// process ends. A port that cannot be bound (taken by another process) is logged and tried
/// again at the next change.
pub async fn serve(checks: Arc<ServiceHealth>, proxy: Arc<Health>, node_ips: Vec<IpAddr>) {
    let addrs: Vec<IpAddr> = if node_ips.is_empty() {
        vec![IpAddr::V4(Ipv4Addr::UNSPECIFIED)]
    } else {
        node_ips
    };
    let mut ports = checks.ports.subscribe();
    let mut servers: BTreeMap<u16, Vec<tokio::task::JoinHandle<()>>> = BTreeMap::new();
    loop {
        let want = ports.borrow_and_update().clone();
        servers.retain(|port, tasks| {
            let keep = want.contains(port);
            if !keep {
                tasks.iter().for_each(tokio::task::JoinHandle::abort);
                tracing::info!(port, "health check port closed");
            }
            keep
        });
        let new: Vec<u16> = want
            .iter()
            .copied()
            .filter(|p| !servers.contains_key(p))
            .collect();
        for port in new {
            let mut tasks = Vec::new();
            for ip in &addrs {
                let addr = SocketAddr::new(*ip, port);
                match tokio::net::TcpListener::bind(addr).await {
                    Ok(listener) => {
                        let router = Router::new().fallback(handle).with_state(Port {
                            port,
                            checks: checks.clone(),
                            proxy: proxy.clone(),
                        });
                        tasks.push(tokio::spawn(async move {
                            if let Err(e) = axum::serve(listener, router).await {
                                tracing::error!(%addr, error = %e, "health check server stopped");
                            }
                        }));
                        tracing::info!(%addr, "serving a Service health check");
                    }
                    Err(e) => {
                        tracing::error!(%addr, error = %e, "cannot serve a Service health check");
                    }
                }
            }
            if !tasks.is_empty() {
                servers.insert(port, tasks);
            }
        }
        if ports.changed().await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(n: usize) -> HealthCheck {
        HealthCheck {
            service: ObjectKey::new("shop", "web"),
            port: 30999,
            local_endpoints: n,
        }
    }

    async fn body(response: Response) -> (StatusCode, String, String) {
        let status = response.status();
        let weight = response.headers()["x-load-balancing-endpoint-weight"]
            .to_str()
            .unwrap()
            .to_owned();
        let bytes = axum::body::to_bytes(response.into_body(), 4096)
            .await
            .unwrap();
        (status, weight, String::from_utf8(bytes.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn kube_proxy_answers() {
        let (status, weight, text) = body(answer(Some(&check(2)), true)).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(weight, "2");
        let json: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "service": {"namespace": "shop", "name": "web"},
                "localEndpoints": 2,
                "serviceProxyHealthy": true,
            })
        );
        let (status, weight, _) = body(answer(Some(&check(0)), true)).await;
        assert_eq!(
            (status, weight.as_str()),
            (StatusCode::SERVICE_UNAVAILABLE, "0")
        );
    }
}
