//! Metrics in the Prometheus text format (version 0.0.4), written by hand:
//! the agent's `GET /metrics` and the control plane's.

use std::fmt::Write;

/// A family: name, help, type (`gauge`, `counter`) and samples (the
/// rendered labels, the value).
pub type Family = (&'static str, &'static str, &'static str, Vec<(String, f64)>);

/// `name{labels} value` lines of each family, under its `HELP` and `TYPE`.
pub fn render_families(families: &[Family]) -> String {
    let mut out = String::new();
    for (name, help, kind, samples) in families {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for (labels, value) in samples {
            let _ = writeln!(out, "{name}{labels} {value}");
        }
    }
    out
}

/// `{k="v",...}` with values escaped as the text format wants; empty for
/// no pairs.
pub fn labels(pairs: &[(&str, &str)]) -> String {
    if pairs.is_empty() {
        return String::new();
    }
    let inner: Vec<String> = pairs
        .iter()
        .map(|(k, v)| {
            let v = v
                .replace('\\', "\\\\")
                .replace('"', "\\\"")
                .replace('\n', "\\n");
            format!("{k}=\"{v}\"")
        })
        .collect();
    format!("{{{}}}", inner.join(","))
}

/// The content type of the text format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_render_in_the_text_format() {
        let text = render_families(&[(
            "cph_x",
            "An x.",
            "gauge",
            vec![(labels(&[("phone_id", "a\"b")]), 2.0), (String::new(), 0.5)],
        )]);
        assert_eq!(
            text,
            "# HELP cph_x An x.\n# TYPE cph_x gauge\ncph_x{phone_id=\"a\\\"b\"} 2\ncph_x 0.5\n"
        );
    }
}
