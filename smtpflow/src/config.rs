//! `--config FILE`: flag values from a TOML file; flags on the command line win.
//!
//! Keys are the long flag names (`iface`, `metrics-addr`, `handshake-timeout`, ...). Top-level
//! keys apply to every command that has the flag; a `[watch]` or `[diagnose]` table holds keys for
//! that command only. The file is turned into flags placed before the command line's, and any key
//! the command line also gives is dropped, so the command line wins, lists included.
use std::{ffi::OsString, path::Path};

use anyhow::{Context as _, bail};
use clap::CommandFactory as _;

use crate::cli::Cli;

/// The commands a config file can configure.
const COMMANDS: [&str; 2] = ["watch", "diagnose"];

/// Expands `--config FILE` in `args` (the process arguments, program name first).
pub fn expand(args: Vec<OsString>) -> anyhow::Result<Vec<OsString>> {
    let Some(cmd_pos) = args.iter().position(|a| COMMANDS.iter().any(|c| a == c)) else {
        return Ok(args);
    };
    let command = args[cmd_pos].to_string_lossy().into_owned();
    let rest = &args[cmd_pos + 1..];
    let Some(path) = config_path(rest) else {
        return Ok(args);
    };
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("reading the config file {}", path.display()))?;
    // A global flag (`--log-level`) may come before the command: all of the command line is
    // looked at for what it gives.
    let flags = to_flags(&text, &command, &args[1..])
        .with_context(|| format!("in the config file {}", path.display()))?;
    let mut out = args[..=cmd_pos].to_vec();
    out.extend(flags);
    out.extend_from_slice(rest);
    Ok(out)
}

fn config_path(args: &[OsString]) -> Option<std::path::PathBuf> {
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let a = a.to_string_lossy();
        if a == "--config" {
            return it.next().map(|p| Path::new(p).to_path_buf());
        }
        if let Some(p) = a.strip_prefix("--config=") {
            return Some(p.into());
        }
    }
    None
}

/// The long names (and short aliases) of `command`'s flags, the global ones (`log-format`,
/// `log-level`) included.
fn known_flags(command: &str) -> Vec<(String, Option<char>)> {
    let cli = Cli::command();
    let Some(sub) = cli.find_subcommand(command) else {
        return Vec::new();
    };
    sub.get_arguments()
        .chain(cli.get_arguments().filter(|a| a.is_global_set()))
        .filter_map(|a| a.get_long().map(|l| (l.to_owned(), a.get_short())))
        .collect()
}

/// Whether the command line gives this flag itself.
fn given(cli_args: &[OsString], long: &str, short: Option<char>) -> bool {
    cli_args.iter().any(|a| {
        let a = a.to_string_lossy();
        a == format!("--{long}")
            || a.starts_with(&format!("--{long}="))
            || short.is_some_and(|s| {
                a == format!("-{s}") || (a.starts_with(&format!("-{s}")) && !a.starts_with("--"))
            })
    })
}

fn scalar(key: &str, v: &toml::Value) -> anyhow::Result<String> {
    Ok(match v {
        toml::Value::String(s) => s.clone(),
        toml::Value::Integer(i) => i.to_string(),
        toml::Value::Float(f) => f.to_string(),
        other => bail!("`{key}` must be a string or a number, not {}", other.type_str()),
    })
}

/// Adds a table's keys to `out`, nested tables as dotted names under `prefix`.
fn flatten(prefix: &str, table: toml::Table, out: &mut Vec<(String, toml::Value)>) {
    for (key, value) in table {
        match value {
            toml::Value::Table(nested) => flatten(&format!("{prefix}{key}."), nested, out),
            value => out.push((format!("{prefix}{key}"), value)),
        }
    }
}

/// The flags a config file's text stands for, for `command`, leaving out those `cli_args` give.
pub fn to_flags(text: &str, command: &str, cli_args: &[OsString]) -> anyhow::Result<Vec<OsString>> {
    let table: toml::Table = text.parse().context("not valid TOML")?;
    let known = known_flags(command);
    let mut entries: Vec<(String, toml::Value)> = Vec::new();
    for (key, value) in table {
        match value {
            toml::Value::Table(section) if COMMANDS.contains(&key.as_str()) => {
                if key == command {
                    flatten("", section, &mut entries);
                }
            }
            // A dotted key such as `web.config.file = "..."` is a nested table in TOML: it
            // names the flag `--web.config.file`.
            toml::Value::Table(nested) => flatten(&format!("{key}."), nested, &mut entries),
            value => entries.push((key, value)),
        }
    }
    let mut flags = Vec::new();
    for (key, value) in entries {
        if key == "config" {
            bail!("`config` cannot be set in a config file");
        }
        let Some((long, short)) = known.iter().find(|(l, _)| *l == key) else {
            let names: Vec<&str> =
                known.iter().map(|(l, _)| l.as_str()).filter(|l| *l != "config").collect();
            bail!(
                "unknown setting `{key}` for `smtpflow {command}` (settings are the long flag names: {})",
                names.join(", ")
            );
        };
        if given(cli_args, long, *short) {
            continue;
        }
        match &value {
            toml::Value::Boolean(true) => flags.push(format!("--{long}").into()),
            toml::Value::Boolean(false) => {}
            toml::Value::Array(items) => {
                for item in items {
                    flags.push(format!("--{long}={}", scalar(&key, item)?).into());
                }
            }
            v => flags.push(format!("--{long}={}", scalar(&key, v)?).into()),
        }
    }
    Ok(flags)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strs(v: &[OsString]) -> Vec<String> {
        v.iter().map(|s| s.to_string_lossy().into_owned()).collect()
    }

    const FILE: &str = r#"
iface = ["eth0", "eth1"]
ports = "25,587"
handshake-timeout = "5s"
max-peers = 1000

[watch]
metrics-addr = "127.0.0.1:9925"

[diagnose]
json = true
"#;

    #[test]
    fn file_becomes_flags_for_its_command() {
        let mut w = strs(&to_flags(FILE, "watch", &[]).unwrap());
        w.sort();
        assert_eq!(
            w,
            [
                "--handshake-timeout=5s",
                "--iface=eth0",
                "--iface=eth1",
                "--max-peers=1000",
                "--metrics-addr=127.0.0.1:9925",
                "--ports=25,587"
            ]
        );
        let d = to_flags(FILE, "diagnose", &[]).unwrap();
        assert!(strs(&d).contains(&"--json".to_string()));
        assert!(!strs(&d).iter().any(|f| f.starts_with("--metrics-addr")));
    }

    #[test]
    fn command_line_wins() {
        let cli: Vec<OsString> = ["-i", "lo", "--ports=465"].iter().map(Into::into).collect();
        let w = to_flags(FILE, "watch", &cli).unwrap();
        assert!(
            !strs(&w).iter().any(|f| f.starts_with("--iface") || f.starts_with("--ports")),
            "{w:?}"
        );
        // End to end: the parsed flags are the command line's.
        let args: Vec<OsString> = ["smtpflow", "watch", "--config", "/dev/null", "-i", "lo"]
            .iter()
            .map(Into::into)
            .collect();
        assert_eq!(config_path(&args[2..]).unwrap(), Path::new("/dev/null"));
    }

    #[test]
    fn dotted_keys_name_dotted_flags() {
        for text in [
            "web.config.file = \"/etc/w.yml\"",
            "[watch]\nweb.config.file = \"/etc/w.yml\"",
            "\"web.config.file\" = \"/etc/w.yml\"",
        ] {
            assert_eq!(
                strs(&to_flags(text, "watch", &[]).unwrap()),
                ["--web.config.file=/etc/w.yml"],
                "{text}"
            );
        }
    }

    #[test]
    fn mistakes_are_named() {
        let e = to_flags("ifcae = \"eth0\"", "watch", &[]).unwrap_err().to_string();
        assert!(e.contains("unknown setting `ifcae`") && e.contains("iface"), "{e}");
        let e = to_flags("[watsh]\nx = 1", "watch", &[]).unwrap_err().to_string();
        assert!(e.contains("unknown setting `watsh.x`"), "{e}");
        assert!(to_flags("iface = [", "watch", &[]).unwrap_err().to_string().contains("TOML"));
        assert!(to_flags("ports = { a = 1 }", "watch", &[]).is_err());
        assert!(to_flags("config = \"x\"", "watch", &[]).is_err());
    }

    #[test]
    fn expanded_args_parse() {
        use clap::Parser as _;
        let dir = std::env::temp_dir().join(format!("smtpflow-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("smtpflow.toml");
        std::fs::write(&path, FILE).unwrap();
        let args: Vec<OsString> = vec![
            "smtpflow".into(),
            "watch".into(),
            "--config".into(),
            path.clone().into(),
            "--max-peers".into(),
            "7".into(),
        ];
        let cli = Cli::try_parse_from(expand(args).unwrap()).unwrap();
        let crate::cli::Command::Watch(w) = cli.command else { panic!("watch") };
        assert_eq!(w.observe.ifaces, ["eth0", "eth1"]);
        assert_eq!(w.observe.max_peers, 7, "the command line wins");
        assert_eq!(w.metrics_addr.to_string(), "127.0.0.1:9925");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The global flags from a file too; the command line still wins, before the command or
    /// after it.
    #[test]
    fn log_flags_from_a_file() {
        use clap::Parser as _;
        let text = "iface = \"eth0\"\nlog-level = \"debug\"\nlog-format = \"json\"\n";
        let parse = |cli_args: &[&str]| {
            let cli_args: Vec<OsString> = cli_args.iter().map(OsString::from).collect();
            let mut args: Vec<OsString> = vec!["smtpflow".into(), "watch".into()];
            args.extend(to_flags(text, "watch", &cli_args).unwrap());
            args.extend(cli_args.iter().filter(|a| *a != "watch").cloned());
            Cli::try_parse_from(args).unwrap()
        };
        let cli = parse(&[]);
        assert_eq!(cli.log_level, Some(crate::cli::LogLevel::Debug));
        assert_eq!(cli.log_format, crate::cli::LogFormat::Json);
        for given in [&["--log-level", "warn"][..], &["--log-level=warn", "watch"]] {
            assert_eq!(parse(given).log_level, Some(crate::cli::LogLevel::Warn), "{given:?}");
        }
    }

    /// The diagnosis thresholds from a file: top level for both commands, a `[diagnose]`
    /// table for that command only.
    #[test]
    fn diagnosis_thresholds_from_a_file() {
        use clap::Parser as _;
        let text = "iface = \"eth0\"\nmin-failures = 20\nmin-share = 0.25\nconntrack-fill = 0.8\n\
                    [diagnose]\nmin-zero-windows = 5\n";
        for (command, zero_windows) in [("watch", 10), ("diagnose", 5)] {
            let mut args: Vec<OsString> = vec!["smtpflow".into(), command.into()];
            args.extend(to_flags(text, command, &[]).unwrap());
            let cli = Cli::try_parse_from(args).unwrap();
            let o = match cli.command {
                crate::cli::Command::Watch(w) => w.observe,
                crate::cli::Command::Diagnose(d) => d.observe,
                _ => panic!("{command}"),
            };
            assert_eq!(
                (o.min_failures, o.min_share, o.conntrack_fill, o.min_zero_windows),
                (20, 0.25, 0.8, zero_windows),
                "{command}"
            );
        }
    }
}
