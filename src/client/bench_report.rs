//! `strom bench` over several rounds and brokers: `--rounds`, `--compare HOST:PORT` and
//! `--plot FILE.svg`.
//!
//! On a shared, noisy machine one run says little and two runs minutes apart say less: the
//! rounds interleave the brokers (A B, B A, A B, ...), so that whatever else the machine does
//! falls on both alike, and every figure is reported as the median of the rounds with its range,
//! and as a ratio (first broker over second) of the medians. The plot draws each run's latency
//! percentile curves from its HDR histogram; the SVG is drawn with `plotters` (its SVG backend
//! only: no font or image libraries).

use std::path::{Path, PathBuf};

use anyhow::{anyhow, Result};
use serde::Serialize;

use super::bench::{self, BenchResult, RunOptions, Workload};

/// A broker the workload runs against.
#[derive(Debug, Clone)]
pub struct Target {
    /// As given on the command line.
    pub bootstrap: String,
    /// `A` for `--bootstrap`, `B` for `--compare`.
    pub label: &'static str,
}

/// One run of the workload against one target.
#[derive(Debug, Clone, Serialize)]
pub struct Round {
    pub target: String,
    pub bootstrap: String,
    pub round: u32,
    #[serde(flatten)]
    pub result: BenchResult,
}

/// A figure over the rounds of one target.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Spread {
    fn of(mut values: Vec<f64>) -> Spread {
        values.sort_by(f64::total_cmp);
        let n = values.len();
        let median = match n {
            0 => f64::NAN,
            _ if n % 2 == 1 => values[n / 2],
            _ => (values[n / 2 - 1] + values[n / 2]) / 2.0,
        };
        Spread {
            median,
            min: values.first().copied().unwrap_or(f64::NAN),
            max: values.last().copied().unwrap_or(f64::NAN),
        }
    }
}

/// Reads one figure from a result.
type Figure = fn(&BenchResult) -> f64;

/// The figures the summary reports, by name, and how each is read from a result.
const FIGURES: &[(&str, Figure)] = &[
    ("produce_msgs_per_s", |r| r.produce_msgs_per_s),
    ("produce_mb_per_s", |r| r.produce_mb_per_s),
    ("consume_mb_per_s", |r| r.consume_mb_per_s),
    ("publish_p50_ms", |r| r.publish_latency_ms.p50),
    ("publish_p99_ms", |r| r.publish_latency_ms.p99),
    ("e2e_p50_ms", |r| r.e2e_latency_ms.p50),
    ("e2e_p99_ms", |r| r.e2e_latency_ms.p99),
    ("e2e_p999_ms", |r| r.e2e_latency_ms.p999),
    ("errors", |r| r.errors as f64),
];

/// Every figure of one target over its rounds.
#[derive(Debug, Clone, Serialize)]
pub struct TargetSummary {
    pub target: String,
    pub bootstrap: String,
    pub figures: Vec<(String, Spread)>,
}

/// What `--json` holds when several rounds ran: the first target's median round under the
/// single-run keys (so readers of one run keep working), then every round, the per-target
/// spreads and, with `--compare`, the ratios A/B of the medians.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    #[serde(flatten)]
    pub median_round: BenchResult,
    pub rounds: Vec<Round>,
    pub summary: Vec<TargetSummary>,
    pub ratios: Vec<(String, f64)>,
}

/// Runs the workload `rounds` times against every target, interleaved: the order alternates
/// every round, so that neither broker always runs first (on a warmer or a quieter machine).
pub fn run_rounds(
    targets: &[Target],
    w: &Workload,
    opts: &RunOptions,
    rounds: u32,
) -> Result<Vec<Round>> {
    let mut out = Vec::new();
    for round in 1..=rounds {
        let mut order: Vec<&Target> = targets.iter().collect();
        if round % 2 == 0 {
            order.reverse();
        }
        for t in order {
            println!("== round {round}/{rounds}: {} ({})", t.label, t.bootstrap);
            let mut o = opts.clone();
            if let Some(prefix) = &opts.hgrm_prefix {
                if rounds > 1 || targets.len() > 1 {
                    o.hgrm_prefix = Some(suffixed(prefix, &format!("{}-r{round}", t.label)));
                }
            }
            let result = bench::run(&t.bootstrap, w.clone(), &o)?;
            println!(
                "   {}: {:.0} msg/s, publish p99 {:.2} ms, e2e p50 {:.2} ms p99 {:.2} ms, errors {}",
                t.label,
                result.produce_msgs_per_s,
                result.publish_latency_ms.p99,
                result.e2e_latency_ms.p50,
                result.e2e_latency_ms.p99,
                result.errors
            );
            out.push(Round {
                target: t.label.to_string(),
                bootstrap: t.bootstrap.clone(),
                round,
                result,
            });
        }
    }
    Ok(out)
}

/// `prefix` with `.tag` added before its extension (or at its end).
fn suffixed(prefix: &Path, tag: &str) -> PathBuf {
    let stem = prefix
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let name = match prefix.extension() {
        Some(ext) => format!("{stem}.{tag}.{}", ext.to_string_lossy()),
        None => format!("{stem}.{tag}"),
    };
    prefix.with_file_name(name)
}

/// The spreads of every target and, with two targets, the ratios of their medians.
pub fn report(targets: &[Target], rounds: Vec<Round>) -> Result<Report> {
    let summary: Vec<TargetSummary> = targets
        .iter()
        .map(|t| {
            let mine: Vec<&BenchResult> = rounds
                .iter()
                .filter(|r| r.target == t.label)
                .map(|r| &r.result)
                .collect();
            TargetSummary {
                target: t.label.to_string(),
                bootstrap: t.bootstrap.clone(),
                figures: FIGURES
                    .iter()
                    .map(|(name, get)| {
                        (
                            (*name).to_string(),
                            Spread::of(mine.iter().map(|r| get(r)).collect()),
                        )
                    })
                    .collect(),
            }
        })
        .collect();
    let ratios = match summary.as_slice() {
        [a, b] => a
            .figures
            .iter()
            .zip(&b.figures)
            .filter(|((name, _), _)| name != "errors")
            .map(|((name, x), (_, y))| (name.clone(), x.median / y.median))
            .collect(),
        _ => Vec::new(),
    };
    // The first target's round whose e2e p99 is the median of its rounds.
    let mut first: Vec<&Round> = rounds
        .iter()
        .filter(|r| targets.first().is_some_and(|t| r.target == t.label))
        .collect();
    first.sort_by(|a, b| {
        a.result
            .e2e_latency_ms
            .p99
            .total_cmp(&b.result.e2e_latency_ms.p99)
    });
    let median_round = first
        .get(first.len() / 2)
        .map(|r| r.result.clone())
        .ok_or_else(|| anyhow!("no round ran"))?;
    Ok(Report {
        median_round,
        rounds,
        summary,
        ratios,
    })
}

/// The summary table: per figure, each target's median [min–max], and the ratio A/B.
pub fn table(r: &Report) -> String {
    let mut out = String::new();
    out.push_str(&format!("{:<20}", "figure"));
    for t in &r.summary {
        out.push_str(&format!(" {:>34}", format!("{} {}", t.target, t.bootstrap)));
    }
    if !r.ratios.is_empty() {
        out.push_str(&format!(" {:>8}", "A/B"));
    }
    out.push('\n');
    for (i, (name, _)) in FIGURES.iter().enumerate() {
        out.push_str(&format!("{name:<20}"));
        for t in &r.summary {
            let s = t.figures[i].1;
            out.push_str(&format!(
                " {:>34}",
                format!("{:.2} [{:.2}-{:.2}]", s.median, s.min, s.max)
            ));
        }
        if let Some((_, ratio)) = r.ratios.iter().find(|(n, _)| n == name) {
            out.push_str(&format!(" {ratio:>8.2}"));
        }
        out.push('\n');
    }
    out
}

/// Where a quantile sits on the plot's x axis: the number of nines (0.99 → 2), so that the
/// tail is spread out as in HdrHistogram's own plots.
fn nines(q: f64, last: f64) -> f64 {
    -(1.0 - q.min(last)).log10()
}

/// Draws every round's publish and end-to-end latency percentile curves into an SVG file.
pub fn plot(path: &Path, title: &str, rounds: &[Round]) -> Result<()> {
    use plotters::prelude::*;
    let err = |e: &dyn std::fmt::Debug| anyhow!("drawing {}: {e:?}", path.display());
    // The last quantile drawn: 1 - 1/count of the largest run (at most five nines).
    let count = rounds
        .iter()
        .map(|r| r.result.produced.max(r.result.consumed))
        .max()
        .unwrap_or(1)
        .max(10) as f64;
    let last = (1.0 - 1.0 / count).min(0.99999);
    let x_max = nines(last, last).ceil().max(1.0);
    let values = rounds
        .iter()
        .flat_map(|r| r.result.publish_curve.iter().chain(&r.result.e2e_curve))
        .map(|(_, ms)| *ms)
        .filter(|ms| *ms > 0.0);
    let (lo, hi) = values.fold((f64::MAX, 0f64), |(lo, hi), v| (lo.min(v), hi.max(v)));
    let (lo, hi) = if hi > 0.0 {
        (lo * 0.8, hi * 1.25)
    } else {
        (0.01, 1.0)
    };
    let root = SVGBackend::new(path, (960, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d(0f64..x_max, (lo..hi).log_scale())
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc("percentile")
        .y_desc("latency (ms)")
        .x_labels(x_max as usize + 1)
        .x_label_formatter(&|x| {
            let q = 100.0 * (1.0 - 10f64.powf(-x));
            let digits = (x.round() as usize).saturating_sub(2);
            format!("{q:.digits$}%")
        })
        .y_label_formatter(&|y| format!("{y}"))
        .draw()
        .map_err(|e| err(&e))?;
    let palette = [
        RGBColor(31, 119, 180),
        RGBColor(214, 39, 40),
        RGBColor(44, 160, 44),
        RGBColor(148, 103, 189),
    ];
    let mut labels: Vec<String> = Vec::new();
    for r in rounds {
        let target = labels
            .iter()
            .position(|l| *l == r.target)
            .unwrap_or_else(|| {
                labels.push(r.target.clone());
                labels.len() - 1
            });
        let color = palette[target % palette.len()];
        for (kind, curve, style) in [
            ("e2e", &r.result.e2e_curve, color.stroke_width(2)),
            (
                "publish",
                &r.result.publish_curve,
                color.mix(0.45).stroke_width(1),
            ),
        ] {
            let points: Vec<(f64, f64)> = curve
                .iter()
                .filter(|(q, ms)| *q <= last && *ms > 0.0)
                .map(|(q, ms)| (nines(*q, last), *ms))
                .collect();
            let label = format!("{} {} r{} {kind}", r.target, r.bootstrap, r.round);
            chart
                .draw_series(LineSeries::new(points, style))
                .map_err(|e| err(&e))?
                .label(label)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}
