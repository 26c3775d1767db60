//! PNG plots of a run: latency vs N for every mode, and full-sync time vs N.

use std::path::Path;

use anyhow::{Context as _, anyhow};
use plotters::prelude::*;

use super::report::Results;

/// Where Debian's fonts-dejavu-core puts its font (installed by `cargo xtask setup`).
const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

fn register_font() -> anyhow::Result<()> {
    let bytes = std::fs::read(FONT).with_context(|| {
        format!("reading {FONT} (cargo xtask setup installs fonts-dejavu-core)")
    })?;
    // plotters keeps fonts for the life of the process.
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
        .map_err(|_| anyhow!("{FONT} is not a usable font"))
}

type Series = (String, RGBColor, Vec<(f64, f64)>);

fn chart(
    path: &Path,
    title: &str,
    y_label: &str,
    series: &[Series],
    log_y: bool,
) -> anyhow::Result<()> {
    // Parts of the bench not run (`--only`) leave a chart without points: no file.
    if series.iter().all(|(_, _, p)| p.is_empty()) {
        return Ok(());
    }
    let points = series.iter().flat_map(|(_, _, p)| p.iter());
    let x_max = points.clone().map(|p| p.0).fold(1.0, f64::max) * 1.5;
    let y_max = points.clone().map(|p| p.1).fold(0.0, f64::max) * 1.2;
    let y_min = points.map(|p| p.1).fold(f64::INFINITY, f64::min);
    let root = BitMapBackend::new(path, (960, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let mut builder = ChartBuilder::on(&root);
    builder
        .caption(title, ("sans-serif", 24))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(72);
    macro_rules! draw {
        ($chart:expr) => {{
            let mut chart = $chart;
            chart
                .configure_mesh()
                .x_desc("Services programmed (N)")
                .x_label_formatter(&|x| format!("{x:.0}"))
                .y_desc(y_label)
                .label_style(("sans-serif", 15))
                .draw()
                .map_err(|e| anyhow!("{e}"))?;
            for (name, color, data) in series {
                if data.is_empty() {
                    continue;
                }
                chart
                    .draw_series(LineSeries::new(data.iter().copied(), color.stroke_width(2)))
                    .map_err(|e| anyhow!("{e}"))?
                    .label(name.clone())
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                    });
                chart
                    .draw_series(data.iter().map(|&p| Circle::new(p, 4, color.filled())))
                    .map_err(|e| anyhow!("{e}"))?;
            }
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .label_font(("sans-serif", 15))
                .position(SeriesLabelPosition::UpperLeft)
                .draw()
                .map_err(|e| anyhow!("{e}"))?;
        }};
    }
    if log_y {
        draw!(
            builder
                .build_cartesian_2d(
                    (0.8..x_max).log_scale(),
                    (y_min.max(1e-6) / 2.0..y_max).log_scale()
                )
                .map_err(|e| anyhow!("{e}"))?
        );
    } else {
        draw!(
            builder
                .build_cartesian_2d((0.8..x_max).log_scale(), 0.0..y_max)
                .map_err(|e| anyhow!("{e}"))?
        );
    }
    root.present().map_err(|e| anyhow!("{e}"))?;
    Ok(())
}

/// Color of a mode, the same in every plot.
fn color(mode: &str) -> RGBColor {
    match mode {
        "direct" => RGBColor(90, 90, 90),
        "lb" => RGBColor(0, 114, 178),
        "iptables" => RGBColor(213, 94, 0),
        "nftables" => RGBColor(0, 158, 115),
        _ => RGBColor(204, 121, 167),
    }
}

fn to_f64(n: usize) -> f64 {
    #[expect(
        clippy::cast_precision_loss,
        reason = "Service counts are far below 2^52"
    )]
    let n = n as f64;
    n
}

/// Writes `<dir>/<name>-latency.png` and `<dir>/<name>-sync.png`.
pub fn write(results: &Results, dir: &Path) -> anyhow::Result<()> {
    register_font()?;
    for (proto, what) in [
        ("tcp", "TCP connect() p50"),
        ("udp", "UDP request/response p50"),
    ] {
        let mut series: Vec<Series> = Vec::new();
        for (mode, target, label) in [
            ("direct", "pod", "direct to the pod"),
            ("lb", "last", "lb"),
            ("iptables", "first", "iptables, first Service"),
            ("iptables", "last", "iptables, last Service"),
            ("nftables", "last", "nftables"),
        ] {
            let mut c = color(mode);
            if mode == "iptables" && target == "first" {
                c = RGBColor(230, 159, 0);
            }
            let data = results
                .latency
                .iter()
                .filter(|r| r.mode == mode && r.target == target && r.proto == proto)
                .map(|r| (to_f64(r.services.max(1)), Results::p50(r)))
                .collect();
            series.push((label.to_owned(), c, data));
        }
        chart(
            &dir.join(format!("{}-latency-{proto}.png", results.name)),
            &format!("{what} vs Services"),
            "µs",
            &series,
            false,
        )?;
    }
    for (proto, what) in [
        ("tcp", "NodePort from outside: TCP connect() p50"),
        ("udp", "NodePort from outside: UDP request/response p50"),
    ] {
        let mut series: Vec<Series> = Vec::new();
        for (mode, target, label, c) in [
            ("direct", "pod", "direct to the pod", color("direct")),
            ("lb-xdp", "last", "lb XDP, last Service", color("lb")),
            (
                "iptables",
                "first",
                "iptables, first Service",
                RGBColor(230, 159, 0),
            ),
            (
                "iptables",
                "last",
                "iptables, last Service",
                color("iptables"),
            ),
        ] {
            let data = results
                .nodeport
                .iter()
                .filter(|r| r.mode == mode && r.target == target && r.proto == proto)
                .map(|r| (to_f64(r.services.max(1)), Results::p50(r)))
                .collect();
            series.push((label.to_owned(), c, data));
        }
        chart(
            &dir.join(format!("{}-nodeport-{proto}.png", results.name)),
            &format!("{what} vs Services"),
            "µs",
            &series,
            false,
        )?;
    }
    let mut series: Vec<Series> = Vec::new();
    let rows = |mode: &str, f: fn(&super::report::SyncRow) -> Option<f64>| -> Vec<(f64, f64)> {
        results
            .full_sync
            .iter()
            .filter(|r| r.mode == mode)
            .filter_map(|r| Some((to_f64(r.services), f(r)?)))
            .collect()
    };
    series.push((
        "lb: sync into the maps".into(),
        color("lb"),
        rows("lb", |r| r.seconds),
    ));
    series.push((
        "lb: lb run to healthy".into(),
        RGBColor(86, 180, 233),
        rows("lb", |r| r.end_to_end_seconds),
    ));
    series.push((
        "iptables-restore".into(),
        color("iptables"),
        rows("iptables", |r| r.seconds),
    ));
    series.push((
        "nft -f".into(),
        color("nftables"),
        rows("nftables", |r| r.seconds),
    ));
    chart(
        &dir.join(format!("{}-sync.png", results.name)),
        "Programming N Services x 10 endpoints from nothing",
        "seconds (log)",
        &series,
        true,
    )?;
    Ok(())
}
