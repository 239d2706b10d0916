//! The config file (`config::to_flags`) and `--ports` (`cli::parse_ports`).
use std::ffi::OsString;

use clap::CommandFactory as _;
use proptest::{collection::vec, prelude::*};

use smtpflow::{
    cli::{Cli, PortList, parse_ports},
    config::to_flags,
};

use super::texty;

/// The long flag names of `command`.
fn long_flags(command: &str) -> Vec<String> {
    let cli = Cli::command();
    let sub = cli.find_subcommand(command).expect("subcommand");
    sub.get_arguments().filter_map(|a| a.get_long().map(str::to_owned)).collect()
}

fn toml_value() -> impl Strategy<Value = String> {
    let scalar = prop_oneof![
        "[ -~]{0,12}".prop_map(|s| format!("{s:?}")),
        any::<i64>().prop_map(|i| i.to_string()),
        any::<f64>().prop_map(|f| if f.is_finite() { format!("{f:?}") } else { "nan".into() }),
        any::<bool>().prop_map(|b| b.to_string()),
    ];
    prop_oneof![
        4 => scalar.clone(),
        1 => vec(scalar.clone(), 0..4).prop_map(|v| format!("[{}]", v.join(", "))),
        1 => vec(vec(scalar, 0..2), 0..2).prop_map(|v| format!("{v:?}").replace('"', "")),
        1 => Just("{ a = 1 }".to_owned()),
    ]
}

/// TOML documents made of keys smtpflow knows and does not, with values of every type, at the
/// top level and in sections (known and unknown).
fn toml_doc() -> impl Strategy<Value = String> {
    let mut keys = long_flags("watch");
    keys.extend(long_flags("diagnose"));
    keys.extend(["nope", "config", "watch", "diagnose"].map(str::to_owned));
    keys.sort();
    keys.dedup();
    let key = proptest::sample::select(keys);
    let line = (key, toml_value()).prop_map(|(k, v)| format!("{k} = {v}\n"));
    let section = prop_oneof![Just("[watch]\n"), Just("[diagnose]\n"), Just("[other]\n")];
    vec(prop_oneof![4 => line, 1 => section.prop_map(str::to_owned)], 0..10)
        .prop_map(|lines| lines.concat())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn config_never_panics(
        text in prop_oneof![texty(), toml_doc()],
        command in prop_oneof![
            Just("watch".to_owned()),
            Just("diagnose".to_owned()),
            Just("check".to_owned()),
            "[a-z]{0,6}",
        ],
        cli in vec("-{0,2}[a-z-]{0,14}(=[a-z0-9]{0,4})?", 0..4),
    ) {
        let cli: Vec<OsString> = cli.into_iter().map(OsString::from).collect();
        let _ = to_flags(&text, &command, &cli);
    }

    /// Known keys with string values become `--key=value` flags, one per key, except those the
    /// command line gives itself.
    #[test]
    fn config_round_trip(
        settings in proptest::sample::subsequence(long_flags("watch"), 0..8)
            .prop_flat_map(|keys| {
                let n = keys.len();
                (Just(keys), vec("[a-z0-9.:]{1,10}", n), vec(any::<bool>(), n))
            }),
    ) {
        let (keys, values, on_cli) = settings;
        let keys: Vec<String> = keys.into_iter().filter(|k| k != "config").collect();
        let text: String =
            // Keys quoted: `web.config.file` unquoted is a dotted key, a table `web` in TOML.
            keys.iter().zip(&values).map(|(k, v)| format!("{k:?} = {v:?}\n")).collect();
        let cli: Vec<OsString> = keys
            .iter()
            .zip(&values)
            .zip(&on_cli)
            .filter(|(_, on)| **on)
            .map(|((k, v), _)| OsString::from(format!("--{k}={v}")))
            .collect();
        let mut got: Vec<String> = to_flags(&text, "watch", &cli)
            .expect("known keys")
            .into_iter()
            .map(|f| f.into_string().expect("UTF-8"))
            .collect();
        let mut want: Vec<String> = keys
            .iter()
            .zip(&values)
            .zip(&on_cli)
            .filter(|(_, on)| !**on)
            .map(|((k, v), _)| format!("--{k}={v}"))
            .collect();
        got.sort();
        want.sort();
        prop_assert_eq!(got, want);
    }

    #[test]
    fn ports_never_panic(text in prop_oneof![texty(), "[0-9, ]{0,40}", "(-?[0-9]{1,6},){0,20}"]) {
        let _ = parse_ports(&text);
    }

    /// Any list of distinct ports 1-65535, at most 16, written with any spacing around the
    /// commas, comes back in order; a repeat, a 0, an empty entry or a 17th port is refused.
    #[test]
    fn ports_round_trip(
        ports in proptest::collection::btree_set(1u16.., 1..=16)
            .prop_flat_map(|s| Just(s.into_iter().collect::<Vec<u16>>()).prop_shuffle()),
        pad in vec("[ \t]{0,2}", 34),
        extra in 1u16..,
    ) {
        let text: String = ports
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let comma = if i > 0 { "," } else { "" };
                format!("{comma}{}{p}{}", pad[2 * i], pad[2 * i + 1])
            })
            .collect();
        prop_assert_eq!(parse_ports(&text), Ok(PortList(ports.clone())));
        prop_assert!(parse_ports(&format!("{text},{}", ports[0])).is_err(), "a repeat");
        prop_assert!(parse_ports(&format!("{text},0")).is_err(), "port 0");
        prop_assert!(parse_ports(&format!("{text},")).is_err(), "an empty entry");
        if ports.len() == 16 && !ports.contains(&extra) {
            prop_assert!(parse_ports(&format!("{text},{extra}")).is_err(), "17 ports");
        }
    }
}
