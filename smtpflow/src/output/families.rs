//! The building blocks of the Prometheus text: metric families assembled from label slices
//! ([`Family`]), encoded by the `prometheus` crate, and the per-peer counters written directly
//! ([`Summed`]), byte for byte what the encoder would write.
use std::io::Write as _;

use prometheus::{
    Encoder as _, TextEncoder,
    proto::{
        Bucket, Counter, Gauge, Histogram as PromHistogram, LabelPair, Metric, MetricFamily,
        MetricType,
    },
};
use smtpflow_common::{HIST_BOUNDS_NS, Histogram};

/// `base` labels followed by `extra` ones.
pub fn joined<'a>(
    base: &[(&'a str, &'a str)],
    extra: &[(&'a str, &'a str)],
) -> Vec<(&'a str, &'a str)> {
    [base, extra].concat()
}

/// A metric family under construction.
pub struct Family {
    name: &'static str,
    help: &'static str,
    kind: MetricType,
    metrics: Vec<Metric>,
}

fn label_pairs(labels: &[(&str, &str)]) -> Vec<LabelPair> {
    labels
        .iter()
        .map(|(n, v)| {
            let mut l = LabelPair::default();
            l.set_name((*n).to_owned());
            l.set_value((*v).to_owned());
            l
        })
        .collect()
}

impl Family {
    pub fn new(name: &'static str, kind: MetricType, help: &'static str) -> Self {
        Self { name, help, kind, metrics: Vec::new() }
    }

    pub fn add(&mut self, labels: &[(&str, &str)], value: f64) {
        let mut m = Metric::from_label(label_pairs(labels));
        if self.kind == MetricType::GAUGE {
            let mut g = Gauge::default();
            g.set_value(value);
            m.set_gauge(g);
        } else {
            let mut c = Counter::default();
            c.set_value(value);
            m.set_counter(c);
        }
        self.metrics.push(m);
    }

    pub fn add_histogram(&mut self, labels: &[(&str, &str)], h: &Histogram) {
        let mut cumulative = 0;
        let mut buckets = Vec::with_capacity(HIST_BOUNDS_NS.len());
        for (bound, n) in HIST_BOUNDS_NS.iter().zip(h.buckets) {
            cumulative += n;
            let mut b = Bucket::default();
            b.set_upper_bound(*bound as f64 / 1e9);
            b.set_cumulative_count(cumulative);
            buckets.push(b);
        }
        let mut p = PromHistogram::default();
        p.set_bucket(buckets);
        p.set_sample_count(h.buckets.iter().sum());
        p.set_sample_sum(h.sum_ns as f64 / 1e9);
        let mut m = Metric::from_label(label_pairs(labels));
        m.set_histogram(p);
        self.metrics.push(m);
    }

    pub fn finish(self, out: &mut Vec<MetricFamily>) {
        if self.metrics.is_empty() {
            return;
        }
        let mut f = MetricFamily::default();
        f.set_name(self.name.to_owned());
        f.set_help(self.help.to_owned());
        f.set_field_type(self.kind);
        f.set_metric(self.metrics);
        out.push(f);
    }
}

/// Families as Prometheus text, appended to `buf`.
pub fn encode(families: &[MetricFamily], buf: &mut Vec<u8>) {
    // Encoding only fails for empty families, which `finish` never emits.
    if let Err(e) = TextEncoder::new().encode(families, buf) {
        log::error!("encoding metrics failed: {e}");
    }
}

/// Per-peer series summed by their full label set; zeros are not exported.
#[derive(Default)]
pub struct Summed(std::collections::BTreeMap<Vec<(&'static str, String)>, u64>);

impl Summed {
    /// Adds `n` to the series `labels` makes; the labels are only made for a nonzero `n`
    /// (most combinations of a peer are zero).
    pub fn add(&mut self, n: u64, labels: impl FnOnce() -> Vec<(&'static str, String)>) {
        if n != 0 {
            *self.0.entry(labels()).or_default() += n;
        }
    }

    /// Appends the series as a counter family in the Prometheus text format, byte for byte
    /// what `TextEncoder` writes (header, label escaping, value), without building protobuf
    /// messages first: the per-peer families are most of the series (4 or more a peer).
    pub fn write_counters(self, name: &str, help: &str, out: &mut Vec<u8>) {
        if self.0.is_empty() {
            return;
        }
        let _ = writeln!(out, "# HELP {name} {}", escape(help, false));
        let _ = writeln!(out, "# TYPE {name} counter");
        for (labels, n) in self.0 {
            out.extend_from_slice(name.as_bytes());
            for (i, (label, value)) in labels.iter().enumerate() {
                let _ = write!(
                    out,
                    "{}{label}=\"{}\"",
                    if i == 0 { '{' } else { ',' },
                    escape(value, true)
                );
            }
            if !labels.is_empty() {
                out.push(b'}');
            }
            let _ = writeln!(out, " {}", n as f64);
        }
    }
}

/// The text format's escaping: `\` and newlines, and `"` in label values.
fn escape(v: &str, quotes: bool) -> std::borrow::Cow<'_, str> {
    let special = v.contains(['\\', '\n']) || (quotes && v.contains('"'));
    if !special {
        return v.into();
    }
    let mut out = String::with_capacity(v.len() + 8);
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '"' if quotes => out.push_str("\\\""),
            c => out.push(c),
        }
    }
    out.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_peer_text_is_what_the_encoder_writes() {
        let series = |iface: &str, n: u64| {
            (vec![("iface", iface.to_owned()), ("peer", "192.0.2.1".to_owned())], n)
        };
        let all = [series("eth0", 3), series(r#"we"ird\if"#, 12_345_678_901), series("n\nl", 1)];
        let mut summed = Summed::default();
        let mut family = Family::new("x_total", MetricType::COUNTER, "Help with \\ and\nlines.");
        for (labels, n) in all.clone() {
            summed.add(n, || labels);
        }
        for (labels, n) in Summed(all.into_iter().collect()).0 {
            let refs: Vec<(&str, &str)> = labels.iter().map(|(k, v)| (*k, v.as_str())).collect();
            family.add(&refs, n as f64);
        }
        let mut families = Vec::new();
        family.finish(&mut families);
        let mut want = Vec::new();
        encode(&families, &mut want);
        let mut got = Vec::new();
        summed.write_counters("x_total", "Help with \\ and\nlines.", &mut got);
        assert_eq!(String::from_utf8(got).unwrap(), String::from_utf8(want).unwrap());
    }
}
