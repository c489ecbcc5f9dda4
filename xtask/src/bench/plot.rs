//! bench.png from results.json, drawn with `plotters`: one panel per direction and frame size,
//! each in the unit that matters for it (Mpps for 64- and 1500-byte frames, Gbit/s for 65000-byte
//! and USO frames) and on its own scale, so memcpy (drawn to the top of the panel with its value
//! written on it when it is off that scale) does not flatten the rest. Bars are medians, whiskers
//! the min-max spread of the runs, a case a frontend or backend cannot carry is a hatched "n/a"
//! slot, and the colours are the Okabe-Ito palette, told apart with colour-blindness.

use std::path::Path;

use anyhow::{anyhow, Context, Result};
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use serde_json::Value;

/// The font every label uses (Debian: fonts-dejavu-core).
pub const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

/// The series: (frontend, backend) as results.json names them, the legend text, the colour.
const SERIES: [(&str, &str, &str, RGBColor); 9] = [
    (
        "card-load",
        "vhost-card",
        "vhost-card (card-load)",
        RGBColor(0, 114, 178),
    ),
    (
        "card-load",
        "vhost-card writev",
        "vhost-card, writev instead of io_uring (card-load)",
        RGBColor(86, 180, 233),
    ),
    (
        "card-load",
        "vhost-card before",
        "vhost-card, before the change (card-load)",
        RGBColor(240, 228, 66),
    ),
    (
        "card-load",
        "dpdk vhost+tap",
        "DPDK vhost + tap PMD (card-load)",
        RGBColor(230, 159, 0),
    ),
    (
        "testpmd",
        "vhost-card",
        "vhost-card (testpmd)",
        RGBColor(0, 158, 115),
    ),
    (
        "testpmd",
        "vhost-card before",
        "vhost-card, before the change (testpmd)",
        RGBColor(160, 220, 195),
    ),
    (
        "testpmd",
        "dpdk vhost+tap",
        "DPDK vhost + tap PMD (testpmd)",
        RGBColor(213, 94, 0),
    ),
    (
        "-",
        "raw tap",
        "raw tap, no virtio (reference)",
        RGBColor(204, 121, 167),
    ),
    ("-", "memcpy", "memcpy (reference)", RGBColor(60, 60, 60)),
];

/// The panels: direction, frame (and USO), title, unit.
struct Panel {
    direction: &'static str,
    frame: u64,
    uso: bool,
    title: &'static str,
    mpps: bool,
    /// A panel of the overhead group (overhead.png) rather than of bench.png.
    overhead: bool,
}

const PANELS: [Panel; 8] = [
    panel(
        "host-to-card",
        64,
        false,
        "host → card, 64-byte frames",
        true,
    ),
    panel(
        "card-to-host",
        64,
        false,
        "card → host, 64-byte frames",
        true,
    ),
    panel(
        "host-to-card",
        1500,
        false,
        "host → card, 1500-byte frames",
        true,
    ),
    panel(
        "card-to-host",
        1500,
        false,
        "card → host, 1500-byte frames",
        true,
    ),
    panel(
        "host-to-card",
        65000,
        false,
        "host → card, 65000-byte frames",
        false,
    ),
    panel(
        "card-to-host",
        65000,
        false,
        "card → host, 65000-byte frames",
        false,
    ),
    panel(
        "host-to-card",
        64810,
        true,
        "host → card, 64 KiB UDP GSO (USO) frames",
        false,
    ),
    panel(
        "card-to-host",
        64810,
        true,
        "card → host, 64 KiB UDP GSO (USO) frames",
        false,
    ),
];

const fn panel(
    direction: &'static str,
    frame: u64,
    uso: bool,
    title: &'static str,
    mpps: bool,
) -> Panel {
    Panel {
        direction,
        frame,
        uso,
        title,
        mpps,
        overhead: false,
    }
}

/// overhead.png: the overhead group, every panel in Mpps.
const OVERHEAD_PANELS: [Panel; 6] = [
    overhead_panel(
        "host-to-card",
        64,
        "host → card, 64-byte frames dropped on entry",
    ),
    overhead_panel(
        "card-to-host",
        64,
        "card → host, 64-byte frames from AF_PACKET",
    ),
    overhead_panel(
        "host-to-card",
        1500,
        "host → card, 1500-byte frames dropped on entry",
    ),
    overhead_panel(
        "card-to-host",
        1500,
        "card → host, 1500-byte frames from AF_PACKET",
    ),
    overhead_panel(
        "host-to-card",
        65000,
        "host → card, 65000-byte frames dropped on entry",
    ),
    overhead_panel(
        "card-to-host",
        65000,
        "card → host, 65000-byte frames from AF_PACKET",
    ),
];

const fn overhead_panel(direction: &'static str, frame: u64, title: &'static str) -> Panel {
    Panel {
        direction,
        frame,
        uso: false,
        title,
        mpps: true,
        overhead: true,
    }
}

/// One bar: its median, min and max in the panel's unit, or why the case cannot be run.
struct Bar {
    series: usize,
    queues: u64,
    median: Option<f64>,
    min: f64,
    max: f64,
    na: bool,
}

fn bars(rows: &[Value], p: &Panel) -> Vec<Bar> {
    let mut out = Vec::new();
    for row in rows {
        let matches = row["direction"] == p.direction
            && row["overhead"].as_bool().unwrap_or(false) == p.overhead
            && row["frame"].as_u64() == Some(p.frame)
            && row["uso"].as_bool() == Some(p.uso);
        if !matches {
            continue;
        }
        let Some(series) = SERIES
            .iter()
            .position(|(f, b, _, _)| row["frontend"] == *f && row["backend"] == *b)
        else {
            continue;
        };
        let value = |run: &Value| {
            if p.mpps {
                run["pps"].as_f64().map(|x| x / 1e6)
            } else {
                run["bytes_per_s"].as_f64().map(|x| x * 8.0 / 1e9)
            }
        };
        let runs: Vec<f64> = row["runs"]
            .as_array()
            .map(|r| r.iter().filter_map(value).collect())
            .unwrap_or_default();
        let median = row["median"]
            .get(if p.mpps { "mpps" } else { "gbit_s" })
            .and_then(Value::as_f64);
        out.push(Bar {
            series,
            queues: row["queues"].as_u64().unwrap_or(1),
            median,
            min: runs.iter().copied().fold(f64::INFINITY, f64::min),
            max: runs.iter().copied().fold(0.0, f64::max),
            na: !row["not_applicable"].is_null(),
        });
    }
    out
}

type Area<'a> = DrawingArea<BitMapBackend<'a>, plotters::coord::Shift>;

/// Draws `results` (results.json's document) into `dir`: bench.png when it holds the
/// delivered-to-sink cases, overhead.png when it holds the overhead group.
pub fn draw(results: &Value, dir: &Path) -> Result<()> {
    let rows = results["rows"]
        .as_array()
        .context("results.json has no rows")?;
    let group = |o: bool| {
        rows.iter()
            .any(|r| r["overhead"].as_bool().unwrap_or(false) == o)
    };
    if group(false) {
        draw_set(
            results,
            &dir.join("bench.png"),
            &PANELS,
            "vhost-card data path: the card against the DPDK vhost + tap pair and the references",
        )?;
    }
    if group(true) {
        draw_set(
            results,
            &dir.join("overhead.png"),
            &OVERHEAD_PANELS,
            "The backend's own cost: nothing behind the tap; the raw tap is the ceiling",
        )?;
    }
    Ok(())
}

/// One image of `panels` (two per row).
fn draw_set(results: &Value, png: &Path, panels: &[Panel], title: &str) -> Result<()> {
    let font = std::fs::read(FONT).with_context(|| {
        format!("reading {FONT} (apt-get install fonts-dejavu-core) for the plot's labels")
    })?;
    // plotters keeps registered fonts for the process's lifetime.
    plotters::style::register_font("sans-serif", FontStyle::Normal, font.leak())
        .map_err(|_| anyhow!("{FONT} is not a usable font"))?;
    let rows = results["rows"]
        .as_array()
        .context("results.json has no rows")?;
    let rows_of_panels = panels.len().div_ceil(2);
    let height = 150 + 537 * rows_of_panels as u32;
    let root = BitMapBackend::new(png, (2000, height)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let (head, body) = root.split_vertically(150);
    // The legend lists the series this image has.
    let shown: Vec<usize> = (0..SERIES.len())
        .filter(|&i| {
            panels
                .iter()
                .any(|p| bars(rows, p).iter().any(|b| b.series == i))
        })
        .collect();
    header(&head, results, title, &shown)?;
    for (area, p) in body
        .split_evenly((rows_of_panels, 2))
        .iter()
        .zip(panels.iter())
    {
        draw_panel(area, p, &bars(rows, p))?;
    }
    root.present().map_err(err)?;
    Ok(())
}

fn err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow!("plotters: {e:?}")
}

/// Title, conditions and the legend.
fn header(area: &Area, results: &Value, text: &str, shown: &[usize]) -> Result<()> {
    let title = ("sans-serif", 30).into_font().color(&BLACK);
    area.draw(&Text::new(text, (20, 10), title)).map_err(err)?;
    let sub =
        format!(
        "bars: median of {} run(s) of {} s, whiskers: min-max of the runs; n/a: the frontend or \
         backend cannot carry that case (bench/README.md); load average at the end {}",
        results["reps"], results["window_s"], results["load_average"].as_str().unwrap_or("?")
    );
    area.draw(&Text::new(sub, (20, 50), ("sans-serif", 18).into_font()))
        .map_err(err)?;
    for (i, &(_, _, label, colour)) in (0i32..).zip(shown.iter().map(|&k| &SERIES[k])) {
        let (x, y) = (20 + (i % 4) * 490, 85 + (i / 4) * 30);
        area.draw(&Rectangle::new([(x, y), (x + 22, y + 18)], colour.filled()))
            .map_err(err)?;
        area.draw(&Text::new(
            label,
            (x + 30, y),
            ("sans-serif", 18).into_font(),
        ))
        .map_err(err)?;
    }
    Ok(())
}

fn draw_panel(area: &Area, p: &Panel, bars: &[Bar]) -> Result<()> {
    let unit = if p.mpps { "Mpps" } else { "Gbit/s" };
    // The scale: every bar but memcpy, whiskers included; memcpy is drawn to the top if higher.
    let memcpy = SERIES.len() - 1;
    let top = bars
        .iter()
        .filter(|b| b.series != memcpy && b.median.is_some())
        .map(|b| b.max.max(b.median.unwrap_or(0.0)))
        .fold(0.0, f64::max);
    let ymax = if top > 0.0 { top * 1.18 } else { 1.0 };
    let mut queues: Vec<u64> = bars.iter().map(|b| b.queues).collect();
    queues.sort_unstable();
    queues.dedup();
    let groups = queues.len().max(1) as f64;
    let series: Vec<usize> = {
        let mut s: Vec<usize> = bars.iter().map(|b| b.series).collect();
        s.sort_unstable();
        s.dedup();
        s
    };
    let mut chart = ChartBuilder::on(area)
        .caption(format!("{} ({unit})", p.title), ("sans-serif", 24))
        .margin(14)
        .x_label_area_size(36)
        .y_label_area_size(72)
        .build_cartesian_2d(0f64..groups, 0f64..ymax)
        .map_err(err)?;
    let qs = queues.clone();
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(2 * queues.len() + 1)
        .x_label_formatter(&move |x| {
            let i = (x - 0.5).round();
            if (x - 0.5 - i).abs() < 1e-6 && i >= 0.0 {
                qs.get(i as usize).map_or(String::new(), |q| {
                    format!("{q} queue pair{}", if *q == 1 { "" } else { "s" })
                })
            } else {
                String::new()
            }
        })
        .y_desc(unit)
        .y_label_formatter(&|y| format!("{y:.2}"))
        .label_style(("sans-serif", 17))
        .axis_desc_style(("sans-serif", 18))
        .draw()
        .map_err(err)?;
    let slot = 0.84 / series.len().max(1) as f64;
    for b in bars {
        let g = queues.iter().position(|q| *q == b.queues).unwrap_or(0) as f64;
        let k = series.iter().position(|s| *s == b.series).unwrap_or(0) as f64;
        let (x0, x1) = (g + 0.08 + k * slot, g + 0.08 + (k + 0.88) * slot);
        let xm = (x0 + x1) / 2.0;
        let colour = SERIES[b.series].3;
        match b.median {
            _ if b.na => {
                // Hatched slot: this case cannot run with this frontend or backend.
                let h = ymax * 0.08;
                chart
                    .draw_series(std::iter::once(Rectangle::new(
                        [(x0, 0.0), (x1, h)],
                        colour.stroke_width(2),
                    )))
                    .map_err(err)?;
                let hatch = (1..6).map(|i| {
                    let y = h * f64::from(i) / 6.0;
                    PathElement::new(vec![(x0, y - h / 6.0), (x1, y)], colour.stroke_width(1))
                });
                chart.draw_series(hatch).map_err(err)?;
                let style = ("sans-serif", 16)
                    .into_font()
                    .transform(FontTransform::Rotate270)
                    .color(&BLACK)
                    .pos(Pos::new(HPos::Left, VPos::Center));
                chart
                    .draw_series(std::iter::once(Text::new(
                        "n/a",
                        (xm, h * 1.04 + ymax * 0.05),
                        style,
                    )))
                    .map_err(err)?;
            }
            None => {}
            Some(m) => {
                let clipped = m > ymax;
                chart
                    .draw_series(std::iter::once(Rectangle::new(
                        [(x0, 0.0), (x1, m.min(ymax))],
                        colour.filled(),
                    )))
                    .map_err(err)?;
                if clipped {
                    let style = ("sans-serif", 16)
                        .into_font()
                        .transform(FontTransform::Rotate270)
                        .color(&WHITE)
                        .pos(Pos::new(HPos::Right, VPos::Center));
                    let text = format!("{m:.0} {unit}, off scale ↑");
                    chart
                        .draw_series(std::iter::once(Text::new(text, (xm, ymax * 0.98), style)))
                        .map_err(err)?;
                } else if b.max > b.min {
                    // The runs' spread.
                    let w = (x1 - x0) * 0.25;
                    let lines = [
                        vec![(xm, b.min), (xm, b.max)],
                        vec![(xm - w, b.min), (xm + w, b.min)],
                        vec![(xm - w, b.max), (xm + w, b.max)],
                    ];
                    chart
                        .draw_series(
                            lines
                                .into_iter()
                                .map(|l| PathElement::new(l, BLACK.stroke_width(2))),
                        )
                        .map_err(err)?;
                }
            }
        }
    }
    Ok(())
}
