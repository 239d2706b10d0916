//! Parsing the Prometheus text format served by smtpflow, and exact lookups in it.
use std::collections::BTreeMap;

/// One scrape: every sample by metric name and its sorted labels.
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    pub samples: BTreeMap<(String, Vec<(String, String)>), f64>,
    pub text: String,
}

fn parse_labels(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = s;
    while let Some(eq) = rest.find('=') {
        let name = rest[..eq].trim_start_matches(',').trim().to_owned();
        let after = &rest[eq + 1..];
        assert!(after.starts_with('"'), "label value not quoted in {s:?}");
        let mut value = String::new();
        let mut chars = after[1..].char_indices();
        let mut end = None;
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => {
                    if let Some((_, n)) = chars.next() {
                        value.push(match n {
                            'n' => '\n',
                            other => other,
                        });
                    }
                }
                '"' => {
                    end = Some(i + 2);
                    break;
                }
                c => value.push(c),
            }
        }
        out.push((name, value));
        rest = &after[end.expect("unterminated label value")..];
    }
    out.sort();
    out
}

impl Metrics {
    pub fn parse(text: &str) -> Self {
        let mut samples = BTreeMap::new();
        for line in text.lines() {
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            let (series, value) =
                line.rsplit_once(' ').unwrap_or_else(|| panic!("bad sample line {line:?}"));
            let value: f64 = value.parse().unwrap_or_else(|_| panic!("bad value in {line:?}"));
            let (name, labels) = match series.find('{') {
                Some(i) => (&series[..i], parse_labels(&series[i + 1..series.len() - 1])),
                None => (series, Vec::new()),
            };
            samples.insert((name.to_owned(), labels), value);
        }
        Self { samples, text: text.to_owned() }
    }

    /// Samples of `name` whose labels include all of `filter`.
    pub fn matching<'a>(
        &'a self,
        name: &'a str,
        filter: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = (&'a [(String, String)], f64)> + 'a {
        self.samples.iter().filter_map(move |((n, labels), v)| {
            let ok = n == name
                && filter
                    .iter()
                    .all(|(k, want)| labels.iter().any(|(lk, lv)| lk == k && lv == want));
            ok.then_some((labels.as_slice(), *v))
        })
    }

    /// Sum of the samples of `name` whose labels include all of `filter` (0 when none).
    pub fn sum(&self, name: &str, filter: &[(&str, &str)]) -> u64 {
        self.matching(name, filter).map(|(_, v)| v as u64).sum()
    }

    /// The one sample of `name` with exactly these labels, if present.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let mut key: Vec<(String, String)> =
            labels.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        key.sort();
        self.samples.get(&(name.to_owned(), key)).copied()
    }

    /// Every value of `label` in the scrape, over all families.
    pub fn label_values(&self, label: &str) -> std::collections::BTreeSet<String> {
        self.samples
            .keys()
            .flat_map(|(_, labels)| {
                labels.iter().filter(|(k, _)| k == label).map(|(_, v)| v.clone())
            })
            .collect()
    }

    /// All non-zero samples of `name`, as `label=value,...` strings, for readable failures.
    pub fn nonzero(&self, name: &str) -> Vec<String> {
        self.matching(name, &[])
            .filter(|(_, v)| *v != 0.0)
            .map(|(labels, v)| {
                let l: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                format!("{{{}}} {v}", l.join(","))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_exposition_text() {
        let m = Metrics::parse(
            "# HELP a x\n# TYPE a counter\na{x=\"1\",y=\"q\\\"z\"} 3\nb 4.5\nc{peer=\"2001:db8::1\"} 7\n",
        );
        assert_eq!(m.get("a", &[("y", "q\"z"), ("x", "1")]), Some(3.0));
        assert_eq!(m.get("b", &[]), Some(4.5));
        assert_eq!(m.sum("c", &[("peer", "2001:db8::1")]), 7);
        assert_eq!(m.sum("a", &[("x", "2")]), 0);
    }
}
