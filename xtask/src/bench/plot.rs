//! PNG plots of a run: latency vs N for every mode, full-sync time vs N, and the XDP cost
//! per packet of lb beside Katran.

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

/// The XDP rows lb and Katran share (IPv4, net of their floors), as grouped bars: what one
/// packet costs each, row by row.
const XDP_BARS: [(&str, &str); 6] = [
    ("c.miss.steady", "miss"),
    ("b.est.steady", "established TCP"),
    ("d.udp_est.steady", "established UDP"),
    ("a.syn_new.steady", "new TCP flow"),
    ("d.udp_new.steady", "new UDP flow"),
    ("b.est.single", "established, 1st run"),
];

/// Writes `<dir>/<name>-xdp.png`: ns per packet of lb's and Katran's XDP programs (IPv4,
/// median net of the floor) for the rows both have. No file without XDP rows.
fn xdp_chart(results: &Results, dir: &Path) -> anyhow::Result<()> {
    let Some(xdp) = &results.xdp else {
        return Ok(());
    };
    let value = |peer: &str, name: &str| {
        xdp.rows
            .iter()
            .find(|r| r.peer == peer && r.family == "ipv4" && r.name == name)
            .and_then(|r| r.net_of_floor)
    };
    let bars: Vec<(&str, Option<f64>, Option<f64>)> = XDP_BARS
        .iter()
        .map(|(name, label)| (*label, value("lb", name), value("katran", name)))
        .filter(|(_, lb, _)| lb.is_some())
        .collect();
    if bars.is_empty() {
        return Ok(());
    }
    let y_max = bars
        .iter()
        .flat_map(|(_, a, b)| [*a, *b])
        .flatten()
        .fold(0.0, f64::max)
        * 1.2;
    let path = dir.join(format!("{}-xdp.png", results.name));
    let root = BitMapBackend::new(&path, (960, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let labels: Vec<&str> = bars.iter().map(|(l, _, _)| *l).collect();
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "XDP cost per packet (test-run, IPv4, net of the floor)",
            ("sans-serif", 24),
        )
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(72)
        .build_cartesian_2d(0.0..to_f64(bars.len()), 0.0..y_max.max(1.0))
        .map_err(|e| anyhow!("{e}"))?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(bars.len() * 2 + 1)
        .x_label_formatter(&|x| {
            let i = x.floor();
            if (x - i - 0.5).abs() < 0.01 && i >= 0.0 {
                #[expect(
                    clippy::cast_possible_truncation,
                    clippy::cast_sign_loss,
                    reason = "a small non-negative bar index"
                )]
                let i = i as usize;
                labels.get(i).map_or_else(String::new, |l| (*l).to_owned())
            } else {
                String::new()
            }
        })
        .y_desc("ns per packet")
        .label_style(("sans-serif", 15))
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    for (peer, offset, c) in [("lb", 0.1, color("lb")), ("Katran", 0.5, color("katran"))] {
        let rects: Vec<Rectangle<(f64, f64)>> = bars
            .iter()
            .enumerate()
            .filter_map(|(i, (_, lb, katran))| {
                let v = if peer == "lb" { *lb } else { *katran }?;
                let x = to_f64(i) + offset;
                Some(Rectangle::new([(x, 0.0), (x + 0.4, v)], c.filled()))
            })
            .collect();
        chart
            .draw_series(rects)
            .map_err(|e| anyhow!("{e}"))?
            .label(peer)
            .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 16, y + 6)], c.filled()));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 15))
        .position(SeriesLabelPosition::UpperLeft)
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    root.present().map_err(|e| anyhow!("{e}"))?;
    Ok(())
}

/// Writes `<dir>/<name>-latency.png` and `<dir>/<name>-sync.png`.
pub fn write(results: &Results, dir: &Path) -> anyhow::Result<()> {
    register_font()?;
    xdp_chart(results, dir)?;
    for (proto, what) in [
        ("tcp", "TCP connect() p50"),
        ("udp", "UDP request/response p50"),
    ] {
        let mut series: Vec<Series> = Vec::new();
        for (mode, target, label) in [
            ("direct", "pods", "direct to the pods"),
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
    for (mode, flows, label, c) in [
        ("direct", "one", "direct, one flow", color("direct")),
        (
            "direct",
            "new",
            "direct, new flows",
            RGBColor(170, 170, 170),
        ),
        (
            "direct+xdp-pass",
            "one",
            "direct + XDP_PASS on n0, one flow",
            RGBColor(0, 158, 115),
        ),
        (
            "direct+xdp-pass",
            "new",
            "direct + XDP_PASS on n0, new flows",
            RGBColor(120, 200, 170),
        ),
        ("lb-xdp", "one", "lb XDP, one flow", color("lb")),
        ("lb-xdp", "new", "lb XDP, new flows", RGBColor(86, 180, 233)),
        ("iptables", "one", "iptables, one flow", color("iptables")),
        (
            "iptables",
            "new",
            "iptables, new flows",
            RGBColor(230, 159, 0),
        ),
    ] {
        let data = results
            .nodeport_pps
            .iter()
            .filter(|r| r.mode == mode && r.flows == flows)
            .map(|r| (to_f64(r.services.max(1)), r.delivered_pps.median / 1e3))
            .collect();
        series.push((label.to_owned(), c, data));
    }
    chart(
        &dir.join(format!("{}-nodeport-pps.png", results.name)),
        "NodePort from outside: UDP datagrams/s delivered to the pod vs Services",
        "thousand datagrams/s (one sending CPU)",
        &series,
        false,
    )?;
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The committed XDP run draws its bar chart (lb beside Katran).
    #[test]
    fn the_xdp_rows_of_a_committed_run_draw_a_chart() {
        let json = include_str!("../../../bench/results/2026-11-30-xdp-nodeport.json");
        let mut results: Results = serde_json::from_str(json).unwrap();
        results.name = "plot-test".into();
        let dir = std::env::temp_dir().join(format!("lb-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        register_font().unwrap();
        xdp_chart(&results, &dir).unwrap();
        let png = std::fs::read(dir.join("plot-test-xdp.png")).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(&png[1..4], b"PNG");
    }

    /// The committed NodePort run has its packets/s rows (every mode, both kinds of flows,
    /// each N) and draws their chart.
    #[test]
    fn the_packets_per_second_rows_of_a_committed_run_draw_a_chart() {
        let json = include_str!("../../../bench/results/2026-11-30-nodeport-pps.json");
        let mut results: Results = serde_json::from_str(json).unwrap();
        assert_eq!(results.nodeport_pps.len(), 4 * 2 * 3);
        assert!(
            results
                .nodeport_pps
                .iter()
                .all(|r| r.delivered_pps.median > 0.0)
        );
        results.name = "plot-pps-test".into();
        let dir = std::env::temp_dir().join(format!("lb-plot-pps-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        write(&results, &dir).unwrap();
        let png = std::fs::read(dir.join("plot-pps-test-nodeport-pps.png")).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(&png[1..4], b"PNG");
    }
}
