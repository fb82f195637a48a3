//! SVG charts of `batchgen bench` runs, drawn by the program itself
//! (plotters' SVG backend): tokens/s and requests/s against load, and the
//! time to first token and inter-token percentiles against load, for the
//! closed loop (against concurrent clients) and the open loop (against the
//! offered rate). With a second run, both share the axes and the captions
//! give the ratio at every load.
use std::path::{Path, PathBuf};

use plotters::prelude::*;

use super::{Level, Percentiles};

#[derive(Debug, thiserror::Error)]
#[error("plotting {path}: {reason}")]
pub struct PlotError {
    pub path: PathBuf,
    pub reason: String,
}

/// One run to draw: its levels and the name its series carry.
#[derive(Debug, Clone, Copy)]
pub struct Run<'a> {
    pub name: &'a str,
    pub levels: &'a [Level],
}

/// What a chart shows of one level, and in what unit.
#[derive(Clone, Copy)]
enum Measure {
    TokensPerSecond,
    RequestsPerSecond,
    Ttft,
    Itl,
}

impl Measure {
    fn file(self) -> &'static str {
        match self {
            Measure::TokensPerSecond => "tokens-per-second",
            Measure::RequestsPerSecond => "requests-per-second",
            Measure::Ttft => "time-to-first-token",
            Measure::Itl => "inter-token-latency",
        }
    }

    fn is_latency(self) -> bool {
        matches!(self, Measure::Ttft | Measure::Itl)
    }

    fn axis(self) -> &'static str {
        match self {
            Measure::TokensPerSecond => "generated tokens per second",
            Measure::RequestsPerSecond => "completed requests per second",
            Measure::Ttft => "time to first token, ms",
            Measure::Itl => "inter-token latency, ms",
        }
    }

    /// The series of one level: (label, value), in the chart's unit.
    fn values(self, l: &Level) -> Vec<(&'static str, f64)> {
        let ms = |p: &Percentiles| vec![("p50", p.p50 * 1e3), ("p90", p.p90 * 1e3), ("p99", p.p99 * 1e3)];
        match self {
            Measure::TokensPerSecond => vec![("tokens/s", l.tokens_per_second)],
            Measure::RequestsPerSecond => vec![("requests/s", l.requests_per_second)],
            Measure::Ttft => ms(&l.ttft_seconds),
            Measure::Itl => ms(&l.itl_seconds),
        }
    }
}

const MEASURES: [Measure; 4] = [Measure::TokensPerSecond, Measure::RequestsPerSecond, Measure::Ttft, Measure::Itl];
const COLOURS: [RGBColor; 3] = [RGBColor(31, 119, 180), RGBColor(255, 127, 14), RGBColor(44, 160, 44)];

/// Writes every chart the runs have data for into `dir` (created if
/// needed): `{closed,open}-loop-{measure}.svg`. Returns the files written.
pub fn write_all(dir: &Path, runs: &[Run<'_>]) -> Result<Vec<PathBuf>, PlotError> {
    std::fs::create_dir_all(dir).map_err(|e| PlotError { path: dir.into(), reason: e.to_string() })?;
    let mut written = Vec::new();
    for (mode, prefix, x_axis) in [
        ("concurrency", "closed-loop", "concurrent clients (closed loop, log scale)"),
        ("rate", "open-loop", "offered load, requests per second (open loop, log scale)"),
    ] {
        let of_mode: Vec<(&str, Vec<&Level>)> =
            runs.iter().map(|r| (r.name, r.levels.iter().filter(|l| l.mode == mode).collect())).collect();
        if of_mode.iter().all(|(_, levels)| levels.is_empty()) {
            continue;
        }
        for m in MEASURES {
            let path = dir.join(format!("{prefix}-{}.svg", m.file()));
            chart(&path, &of_mode, m, x_axis).map_err(|reason| PlotError { path: path.clone(), reason })?;
            written.push(path);
        }
    }
    if runs.iter().any(|r| r.levels.iter().any(|l| !l.ttft_by_turn.is_empty())) {
        let path = dir.join("closed-loop-time-to-first-token-by-turn.svg");
        turns_chart(&path, runs).map_err(|reason| PlotError { path: path.clone(), reason })?;
        written.push(path);
    }
    Ok(written)
}

/// TTFT percentiles against the turn of the conversation (`--turns`): the
/// first level with turns of each run.
fn turns_chart(path: &Path, runs: &[Run<'_>]) -> Result<(), String> {
    let err = |e: &dyn std::fmt::Debug| format!("{e:?}");
    // Each turn as a level whose value is the turn's number.
    let per_turn: Vec<(&str, Vec<Level>)> = runs
        .iter()
        .filter_map(|r| {
            let l = r.levels.iter().find(|l| !l.ttft_by_turn.is_empty())?;
            let turns = l.ttft_by_turn.iter().enumerate();
            Some((
                r.name,
                turns.map(|(t, p)| Level { value: (t + 1) as f64, ttft_seconds: p.clone(), ..l.clone() }).collect(),
            ))
        })
        .collect();
    let runs: Vec<(&str, Vec<&Level>)> = per_turn.iter().map(|(n, ls)| (*n, ls.iter().collect())).collect();
    let turns = runs.iter().map(|(_, ls)| ls.len()).max().unwrap_or(1) as f64;
    let y_max = runs.iter().flat_map(|(_, ls)| ls.iter().map(|l| l.ttft_seconds.p99 * 1e3)).fold(0.0, f64::max);
    let root = SVGBackend::new(path, (900, 540)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let chart = ChartBuilder::on(&root)
        .caption("time to first token by turn of the conversation", ("sans-serif", 18))
        .margin(16)
        .x_label_area_size(50)
        .y_label_area_size(70)
        .build_cartesian_2d(0.5..turns + 0.5, 0.0..(y_max * 1.15).max(1e-9))
        .map_err(|e| err(&e))?;
    draw(chart, &runs, Measure::Ttft, "turn (each prompt is the conversation so far)", Measure::Ttft.axis())?;
    root.present().map_err(|e| err(&e))
}

/// "b / a: 1.45× at 16, …" for the first series of two runs.
fn ratios(runs: &[(&str, Vec<&Level>)], m: Measure) -> Option<String> {
    let [(a, la), (b, lb)] = runs else { return None };
    let parts: Vec<String> = lb
        .iter()
        .filter_map(|l| {
            let base = la.iter().find(|o| o.value == l.value)?;
            let (x, y) = (m.values(base)[0].1, m.values(l)[0].1);
            (x > 0.0).then(|| format!("{:.2}× at {}", y / x, l.value))
        })
        .collect();
    (!parts.is_empty()).then(|| format!("{b} / {a} ({}): {}", m.values(lb[0])[0].0, parts.join(", ")))
}

fn chart(path: &Path, runs: &[(&str, Vec<&Level>)], m: Measure, x_axis: &str) -> Result<(), String> {
    let err = |e: &dyn std::fmt::Debug| format!("{e:?}");
    let xs = || runs.iter().flat_map(|(_, ls)| ls.iter().map(|l| l.value));
    let (lo, hi) = (xs().fold(f64::INFINITY, f64::min), xs().fold(0.0, f64::max));
    let y_max = runs.iter().flat_map(|(_, ls)| ls.iter().flat_map(|l| m.values(l))).map(|v| v.1).fold(0.0, f64::max);
    let root = SVGBackend::new(path, (900, 540)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let title = match ratios(runs, m) {
        Some(r) => format!("{} against load — {r}", m.axis()),
        None => format!("{} against load", m.axis()),
    };
    let builder = || {
        let mut b = ChartBuilder::on(&root);
        b.caption(title.clone(), ("sans-serif", 18)).margin(16).x_label_area_size(50).y_label_area_size(70);
        b
    };
    let x = (lo / 1.3..hi * 1.3).log_scale();
    let y_min = runs
        .iter()
        .flat_map(|(_, ls)| ls.iter().flat_map(|l| m.values(l)))
        .map(|v| v.1)
        .filter(|&v| v > 0.0)
        .fold(f64::INFINITY, f64::min);
    // Latencies that span more than a decade read better on a log axis.
    if m.is_latency() && y_min.is_finite() && y_max / y_min > 20.0 {
        let chart = builder().build_cartesian_2d(x, (y_min / 1.5..y_max * 1.5).log_scale()).map_err(|e| err(&e))?;
        draw(chart, runs, m, x_axis, &format!("{} (log scale)", m.axis()))?;
    } else {
        let chart = builder().build_cartesian_2d(x, 0.0..(y_max * 1.15).max(1e-9)).map_err(|e| err(&e))?;
        draw(chart, runs, m, x_axis, m.axis())?;
    }
    root.present().map_err(|e| err(&e))
}

/// Draws the mesh, every run's series and the legend on `chart`.
fn draw<'a, X, Y>(
    mut chart: ChartContext<'a, SVGBackend<'a>, Cartesian2d<X, Y>>,
    runs: &[(&str, Vec<&Level>)],
    m: Measure,
    x_axis: &str,
    y_axis: &str,
) -> Result<(), String>
where
    X: Ranged<ValueType = f64> + plotters::coord::ranged1d::ValueFormatter<f64>,
    Y: Ranged<ValueType = f64> + plotters::coord::ranged1d::ValueFormatter<f64>,
{
    let err = |e: &dyn std::fmt::Debug| format!("{e:?}");
    chart
        .configure_mesh()
        .x_desc(x_axis)
        .y_desc(y_axis)
        .x_label_formatter(&|x| format!("{x}"))
        .light_line_style(TRANSPARENT)
        .axis_desc_style(("sans-serif", 16))
        .draw()
        .map_err(|e| err(&e))?;
    for (r, (name, levels)) in runs.iter().enumerate() {
        let Some(first) = levels.first() else { continue };
        for (s, (label, _)) in m.values(first).into_iter().enumerate() {
            // Runs differ by colour, percentiles by line style.
            let colour = COLOURS[r % COLOURS.len()];
            let style =
                ShapeStyle { color: colour.mix([1.0, 0.75, 0.5][s % 3]), filled: true, stroke_width: [3, 2, 2][s % 3] };
            let points: Vec<(f64, f64)> = levels.iter().map(|l| (l.value, m.values(l)[s].1)).collect();
            let series = if runs.len() > 1 { format!("{name}: {label}") } else { label.to_string() };
            chart.draw_series(LineSeries::new(points.clone(), style)).map_err(|e| err(&e))?.label(series).legend(
                move |(x, y)| {
                    EmptyElement::at((x, y))
                        + PathElement::new(vec![(-12, 0), (12, 0)], style)
                        + Circle::new((0, 0), [4, 0, 0][s % 3], style.filled())
                        + TriangleMarker::new((0, 0), [0, 6, 0][s % 3], style.filled())
                        + Cross::new((0, 0), [0, 0, 5][s % 3], style)
                },
            );
            // And by marker: p50 circles, p90 triangles, p99 crosses.
            match s {
                0 => chart.draw_series(points.into_iter().map(|p| Circle::new(p, 4, style.filled()))),
                1 => chart.draw_series(points.into_iter().map(|p| TriangleMarker::new(p, 6, style.filled()))),
                _ => chart.draw_series(points.into_iter().map(|p| Cross::new(p, 5, style))),
            }
            .map_err(|e| err(&e))?;
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 15))
        .draw()
        .map_err(|e| err(&e))
}

/// Reads a run saved with `batchgen bench --json`.
pub fn read_run(path: &Path) -> Result<Vec<Level>, PlotError> {
    let bad = |reason: String| PlotError { path: path.into(), reason };
    let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
    serde_json::from_str(&text).map_err(|e| bad(format!("not a `batchgen bench --json` run: {e}")))
}

/// Charts of `levels`, beside the run saved at `earlier` when given (named
/// by its file name; `levels` is then "this run" unless `name` says more).
pub fn write_with(dir: &Path, name: &str, levels: &[Level], earlier: Option<&Path>) -> Result<Vec<PathBuf>, PlotError> {
    let Some(earlier) = earlier else {
        return write_all(dir, &[Run { name, levels }]);
    };
    let before = read_run(earlier)?;
    let before_name = earlier.file_stem().map_or("earlier".into(), |s| s.to_string_lossy().into_owned());
    write_all(dir, &[Run { name: &before_name, levels: &before }, Run { name, levels }])
}
