//! The health and metrics endpoints, on kube-proxy's default addresses.

use std::{net::SocketAddr, sync::Arc};

use anyhow::Context as _;
use axum::{Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
use tokio::net::TcpListener;

use crate::{health::Health, metrics::Metrics};

async fn healthz(State(health): State<Arc<Health>>) -> impl IntoResponse {
    let report = health.report();
    let status = if report.healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = serde_json::to_string(&report).unwrap_or_default();
    (status, [("content-type", "application/json")], body)
}

async fn livez(State(health): State<Arc<Health>>) -> impl IntoResponse {
    if health.live() {
        (StatusCode::OK, "ok")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "stuck: a change has not reached the kernel in time",
        )
    }
}

async fn metrics(State(metrics): State<Arc<Metrics>>) -> impl IntoResponse {
    match crate::metrics::render(&metrics) {
        Ok(text) => (
            StatusCode::OK,
            [(
                "content-type",
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        ),
        Err(_) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [("content-type", "text/plain")],
            String::new(),
        ),
    }
}

/// Binds `addr` now (so a taken port fails at start-up) and serves `router` in the background.
async fn serve(what: &'static str, addr: SocketAddr, router: Router) -> anyhow::Result<()> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the {what} address {addr}"))?;
    tracing::info!(%addr, "serving {what}");
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router).await {
            tracing::error!(error = %e, "{what} server stopped");
        }
    });
    Ok(())
}

/// Starts `/healthz` (and `/livez`) on `healthz_addr` and `/metrics` on `metrics_addr`;
/// `None` disables one.
pub async fn start(
    healthz_addr: Option<SocketAddr>,
    metrics_addr: Option<SocketAddr>,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
) -> anyhow::Result<()> {
    if let Some(addr) = healthz_addr {
        let router = Router::new()
            .route("/healthz", get(healthz))
            .route("/livez", get(livez))
            .with_state(health);
        serve("healthz", addr, router).await?;
    }
    if let Some(addr) = metrics_addr {
        let router = Router::new()
            .route("/metrics", get(self::metrics))
            .with_state(metrics);
        serve("metrics", addr, router).await?;
    }
    Ok(())
}
