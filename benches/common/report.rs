//! The comparison report every bench writes: `target/bench-report/<bench>.json`,
//! a list of `{"metric", "ours", "anchor", "unit", "ratio"}` with
//! ratio = ours / anchor, so anyone can read a run's result.

use std::path::Path;

/// One compared figure.
pub struct Metric {
    pub metric: String,
    pub ours: f64,
    pub anchor: f64,
    pub unit: &'static str,
}

/// Writes the report of `bench` and prints it.
pub fn write(bench: &str, metrics: &[Metric]) {
    let out: Vec<serde_json::Value> = metrics
        .iter()
        .map(|m| {
            serde_json::json!({
                "metric": m.metric,
                "ours": m.ours,
                "anchor": m.anchor,
                "unit": m.unit,
                "ratio": if m.anchor > 0.0 { m.ours / m.anchor } else { 0.0 },
            })
        })
        .collect();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-report");
    std::fs::create_dir_all(&dir).expect("report dir");
    let text = serde_json::to_string_pretty(&out).expect("json");
    std::fs::write(dir.join(format!("{bench}.json")), &text).expect("write report");
    println!("{text}");
}
