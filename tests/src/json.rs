//! JSON for the tests (Prometheus API answers, the Grafana dashboard, `diagnose --json`):
//! [`serde_json`]'s value, parsed with `text.parse::<Json>()` and walked by indexing
//! (`v["data"]["result"]`, `Null` where a member is missing), plus two helpers.
use std::collections::BTreeMap;

pub use serde_json::Value as Json;

pub trait JsonExt {
    /// The elements of an array (empty for anything else).
    fn items(&self) -> &[Json];
    /// An object of strings (such as a Prometheus label set) as a sorted map.
    fn string_map(&self) -> BTreeMap<String, String>;
}

impl JsonExt for Json {
    fn items(&self) -> &[Json] {
        self.as_array().map_or(&[], Vec::as_slice)
    }

    fn string_map(&self) -> BTreeMap<String, String> {
        self.as_object()
            .into_iter()
            .flatten()
            .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn walks_prometheus_answers() {
        let v: Json = r#"{"status":"success","data":{"resultType":"vector","result":[{"metric":{"instance":"mx1","n":1},"value":[1.5e3,"15"]}]}}"#
            .parse()
            .unwrap();
        assert_eq!(v["status"].as_str(), Some("success"));
        let r = &v["data"]["result"].items()[0];
        let m = r["metric"].string_map();
        assert_eq!(m.len(), 1, "only the strings: {m:?}");
        assert_eq!(m["instance"], "mx1");
        assert_eq!(r["value"].items()[0].as_f64(), Some(1500.0));
        assert!(v["data"]["nosuch"]["deeper"].is_null());
        assert!(v["status"].items().is_empty() && v["status"].string_map().is_empty());
    }
}
