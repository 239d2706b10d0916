//! Command line: `smtpflow watch` and its flags. Every duration flag takes values like `500ms`,
//! `1s` or `10s`.
use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand, ValueEnum};
use smtpflow_common::{DEFAULT_MAX_FLOWS, DEFAULT_MAX_PEERS, MAX_IFACES, MAX_PORTS};

use crate::kernel::{Mode, TcLink, XdpAttach};

#[derive(Debug, Parser)]
#[command(
    name = "smtpflow",
    version,
    about = "SMTP handshake and TCP pressure observer for mail gateways (eBPF)",
    long_about = "smtpflow counts SYN, SYN-ACK, RST and zero-window events on the SMTP ports in \
                  the kernel (TC or XDP) and exports them, per peer and in total, as Prometheus \
                  metrics. It must run as root (or with CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON)."
)]
pub struct Cli {
    /// Log lines as text, or as one JSON object a line (for log shippers).
    #[arg(long, value_enum, global = true, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Which log lines to show; without it, what RUST_LOG says, else `info`. `debug` also turns
    /// on the kernel programs' own reports of what failed in them (a map refusing an entry,
    /// the payload ring full), each on its 1st, 2nd, 4th, 8th… time on a CPU, under target
    /// `smtpflow::kernel`. Other crates' lines stay at `info` and above (RUST_LOG shows theirs).
    #[arg(long, value_enum, global = true)]
    pub log_level: Option<LogLevel>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// `--log-level`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogLevel {
    Off,
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

impl LogLevel {
    pub fn filter(self) -> log::LevelFilter {
        match self {
            Self::Off => log::LevelFilter::Off,
            Self::Error => log::LevelFilter::Error,
            Self::Warn => log::LevelFilter::Warn,
            Self::Info => log::LevelFilter::Info,
            Self::Debug => log::LevelFilter::Debug,
            Self::Trace => log::LevelFilter::Trace,
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Attach to interfaces, count SMTP TCP events and serve them on /metrics until stopped.
    Watch(WatchArgs),
    /// Attach, observe for a while, and say which cause of failing SMTP handshakes is active,
    /// with the evidence. Exit status: 0 healthy, 1 a cause is active, 2 error.
    Diagnose(DiagnoseArgs),
    /// Tell whether this host can run smtpflow: kernel, BTF, capabilities, TC/XDP, conntrack,
    /// tracepoints, interfaces. Prints a table with a fix for each failure; exit status 0 when
    /// nothing failed, 1 otherwise.
    Check(CheckArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    #[command(hide = true)]
    Completions { shell: clap_complete::Shell },
    /// Print the man page (roff).
    #[command(hide = true)]
    Man,
}

#[derive(Debug, Clone, Args)]
pub struct CheckArgs {
    /// Interface to check as well; repeat for several.
    #[arg(long = "iface", short = 'i', value_name = "IFACE")]
    pub ifaces: Vec<String>,
}

/// What to watch and how: shared by `watch` and `diagnose`.
#[derive(Debug, Clone, Args)]
pub struct ObserveArgs {
    /// Read flag values from this TOML file (keys are the long flag names; [watch] and
    /// [diagnose] tables for command-specific ones). Flags on the command line win.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Interface to watch; repeat for several (each is its own `iface` label).
    #[arg(long = "iface", short = 'i', required = true, value_name = "IFACE")]
    pub ifaces: Vec<String>,

    /// Where the kernel programs attach.
    #[arg(long, value_enum, default_value_t = Mode::Tc)]
    pub mode: Mode,

    /// How TC programs attach (tc mode only).
    #[arg(long, value_enum, default_value_t = TcLink::Auto)]
    pub tc_link: TcLink,

    /// Which XDP mode --mode xdp attaches in (xdp mode only).
    #[arg(long, value_enum, default_value_t = XdpAttach::Auto)]
    pub xdp_mode: XdpAttach,

    /// SMTP ports, comma separated (at most 16).
    #[arg(long, value_name = "PORTS", default_value = "25,465,587", value_parser = parse_ports)]
    pub ports: PortList,

    /// Capacity of the per-peer table (the kernel's LRU map, or smtpflow's own with
    /// --peer-counts log); the least recently seen peers are evicted (their events stay in the
    /// exact totals).
    #[arg(long, value_name = "N", default_value_t = DEFAULT_MAX_PEERS,
          value_parser = clap::value_parser!(u32).range(1..=16_777_216))]
    pub max_peers: u32,

    /// Where per-peer counts are kept: `map`, the kernel's per-peer LRU map (a lookup a counted
    /// packet, an insert a new peer); `log`, records the kernel appends to a ring buffer and
    /// smtpflow adds up in a table of its own (--max-peers entries; a peer not counted again
    /// since the last pass is evicted first, and evictions are counted): cheaper in the kernel
    /// under a SYN flood from new sources, at the cost of userspace CPU and memory. The metrics
    /// are the same.
    #[arg(long, value_enum, default_value_t = PeerCounts::Map)]
    pub peer_counts: PeerCounts,

    /// Connections the kernel's flow table follows with none overwritten (handshake state,
    /// greetings, replies): it has twice as many ways, two candidate sets of 8 a connection;
    /// past that, overwritten connections are counted as evictions.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_MAX_FLOWS,
          value_parser = clap::value_parser!(u32).range(1..=16_777_216))]
    pub max_flows: u32,

    /// A SYN with no SYN-ACK, RST or ICMP unreachable after this long is a `timeout` handshake
    /// (an answer later than this counts no outcome). The default sits between Linux's SYN
    /// retransmissions at 3 s and 7 s.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = parse_duration)]
    pub handshake_timeout: Duration,

    /// SMTP ports carrying plaintext SMTP, whose server replies are read (a subset of --ports;
    /// reading stops after STARTTLS). Default: 25 and 587 where watched. Empty: read none.
    #[arg(long, value_name = "PORTS", value_parser = parse_reply_ports)]
    pub reply_ports: Option<PortList>,

    /// How often the kernel maps are drained; a scrape shows every event up to this long ago.
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = parse_interval)]
    pub interval: Duration,

    /// A failure cause needs at least this many failures in the window: per peer, throttled
    /// sessions (remote_throttling), refused handshakes (remote_refusing) or unanswered
    /// handshakes (remote_unreachable); for the host, unanswered inbound SMTP SYNs
    /// (conntrack_exhaustion) and SMTP SYNs dropped on a full listen queue, or ListenOverflows
    /// while an SMTP listener is full (listen_overflow).
    #[arg(long, value_name = "N", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    pub min_failures: u64,

    /// ...and those failures must be at least this share of the attempts (0 to 1): of the
    /// peer's established sessions (remote_throttling), of the peer's handshakes
    /// (remote_refusing, remote_unreachable), of the inbound SMTP handshakes
    /// (conntrack_exhaustion). 0 turns the share test off.
    #[arg(long, value_name = "RATIO", default_value_t = 0.1, value_parser = parse_share)]
    pub min_share: f64,

    /// A stall cause needs at least this many zero-window events in the window: ours for
    /// local_receive_stall, one peer's for peer_receive_stall.
    #[arg(long, value_name = "N", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    pub min_zero_windows: u64,

    /// Conntrack counts as under pressure from this fill ratio (entries / nf_conntrack_max), or
    /// when its own table-full `drop` statistic rises: conntrack_exhaustion needs it, and
    /// remote_unreachable needs it absent.
    #[arg(long, value_name = "RATIO", default_value_t = 0.9, value_parser = parse_ratio)]
    pub conntrack_fill: f64,

    /// How peers are written in exported series and log lines: their address, their network
    /// (--peer-prefix-v4/-v6; peers of one network are summed), or a keyed hash
    /// (--peer-hash-key-file).
    #[arg(long, value_enum, default_value_t = PeerLabelMode::Ip)]
    pub peer_label: PeerLabelMode,

    /// Prefix length of IPv4 peers with --peer-label prefix.
    #[arg(long, value_name = "BITS", default_value_t = 24, value_parser = clap::value_parser!(u8).range(0..=32))]
    pub peer_prefix_v4: u8,

    /// Prefix length of IPv6 peers with --peer-label prefix.
    #[arg(long, value_name = "BITS", default_value_t = 64, value_parser = clap::value_parser!(u8).range(0..=128))]
    pub peer_prefix_v6: u8,

    /// Key of --peer-label hash; gateways sharing it label a peer alike.
    #[arg(long, value_name = "FILE", default_value = "/etc/machine-id")]
    pub peer_hash_key_file: PathBuf,

    /// Sites of your own: lines `suffix <name suffix> <site>` (remote names ending so) and
    /// `cidr <prefix>/<len> <site>` (peers with no name learnt yet, or none ever); `#`
    /// comments. Without a rule, a remote's site is the registrable domain of the name it gave
    /// (its greeting or EHLO reply outbound, its EHLO inbound), or `unknown`.
    #[arg(long, value_name = "FILE")]
    pub site_map: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PeerCounts {
    Map,
    Log,
}

impl PeerCounts {
    /// The kernel's [`smtpflow_common::Config::peer_log`].
    pub fn config(self) -> u32 {
        match self {
            Self::Map => smtpflow_common::peer::peer_counts::MAP,
            Self::Log => smtpflow_common::peer::peer_counts::LOG,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PeerLabelMode {
    Ip,
    Prefix,
    Hash,
}

#[derive(Debug, Clone, Args)]
pub struct WatchArgs {
    #[command(flatten)]
    pub observe: ObserveArgs,

    /// Address of the Prometheus endpoint (/metrics, /healthz).
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:9925")]
    pub metrics_addr: SocketAddr,

    /// Most peers exported as per-peer series (labels, with --peer-label prefix), so a flood of
    /// spoofed sources cannot explode the scrape. New peers enter by recent activity when a
    /// place is free; an exported series keeps its place until --peer-series-idle.
    #[arg(long, value_name = "N", default_value_t = 1000)]
    pub max_peer_series: usize,

    /// Most sites with their own smtpflow_site_* series, in the order they first counted
    /// something; the rest is summed into site="other" (`unknown` and `other` take no place).
    #[arg(long, value_name = "N", default_value_t = crate::sites::attribute::DEFAULT_MAX_SITE_SERIES)]
    pub max_site_series: usize,

    /// An exported per-peer series that has not increased for this long leaves the export set,
    /// freeing its place for a newly active peer (per-site series too). Per-peer series only
    /// ever go up while exported.
    #[arg(long, value_name = "DURATION", default_value = "10m", value_parser = parse_series_idle)]
    pub peer_series_idle: Duration,

    /// Keep every capability after attaching (by default all but CAP_NET_ADMIN are dropped once
    /// the programs are attached and the maps held).
    #[arg(long)]
    pub keep_privileges: bool,

    /// Run as this user once attached (with only CAP_NET_ADMIN).
    #[arg(long, value_name = "USER", conflicts_with = "keep_privileges")]
    pub user: Option<String>,

    /// TLS and basic auth for the metrics endpoint, in the Prometheus exporters' web config
    /// format (tls_server_config, basic_auth_users with bcrypt hashes).
    #[arg(long = "web.config.file", value_name = "FILE")]
    pub web_config_file: Option<PathBuf>,

    /// The diagnosis looks this far back.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = parse_interval)]
    pub window: Duration,

    /// How often a status line is printed to stderr (0s: never).
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = parse_duration)]
    pub status_every: Duration,
}

#[derive(Debug, Clone, Args)]
pub struct DiagnoseArgs {
    #[command(flatten)]
    pub observe: ObserveArgs,

    /// How long to observe; the diagnosis covers this whole time.
    #[arg(long = "for", value_name = "DURATION", default_value = "10s", value_parser = parse_interval)]
    pub duration: Duration,

    /// Print the verdict as JSON.
    #[arg(long)]
    pub json: bool,
}

/// A validated, de-duplicated list of SMTP ports in the order given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortList(pub Vec<u16>);

pub fn parse_ports(s: &str) -> Result<PortList, String> {
    let mut ports = Vec::new();
    for part in s.split(',') {
        let part = part.trim();
        if part.is_empty() {
            return Err(format!("empty entry in port list {s:?} (write e.g. 25,465,587)"));
        }
        let port: u16 =
            part.parse().map_err(|_| format!("{part:?} is not a TCP port (1-65535)"))?;
        if port == 0 {
            return Err("port 0 is not a TCP port (1-65535)".into());
        }
        if ports.contains(&port) {
            return Err(format!("port {port} is listed twice"));
        }
        ports.push(port);
    }
    if ports.len() > MAX_PORTS {
        return Err(format!("{} ports given; at most {MAX_PORTS} are supported", ports.len()));
    }
    Ok(PortList(ports))
}

fn parse_reply_ports(s: &str) -> Result<PortList, String> {
    if s.trim().is_empty() { Ok(PortList(Vec::new())) } else { parse_ports(s) }
}

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s)
        .map_err(|e| format!("{s:?} is not a duration ({e}); write e.g. 500ms, 1s or 10s"))
}

fn parse_ratio(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if r > 0.0 && r <= 1.0 => Ok(r),
        _ => Err(format!("{s:?} is not a ratio between 0 and 1 (e.g. 0.9)")),
    }
}

fn parse_series_idle(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d < Duration::from_secs(1) {
        return Err(format!("{s:?} is too short; --peer-series-idle must be at least 1s"));
    }
    Ok(d)
}

fn parse_share(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if (0.0..=1.0).contains(&r) => Ok(r),
        _ => Err(format!("{s:?} is not a share between 0 and 1 (e.g. 0.1 for 10 %)")),
    }
}

fn parse_interval(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d < Duration::from_millis(10) {
        return Err(format!("{s:?} is too short; the drain interval must be at least 10ms"));
    }
    Ok(d)
}

impl ObserveArgs {
    /// How peers are labelled, reading the hash key when needed.
    pub fn peer_labeler(&self) -> anyhow::Result<crate::output::peer_label::PeerLabel> {
        use crate::output::peer_label::PeerLabel;
        Ok(match self.peer_label {
            PeerLabelMode::Ip => PeerLabel::Ip,
            PeerLabelMode::Prefix => {
                PeerLabel::Prefix { v4: self.peer_prefix_v4, v6: self.peer_prefix_v6 }
            }
            PeerLabelMode::Hash => {
                let path = &self.peer_hash_key_file;
                let key = std::fs::read(path).map_err(|e| {
                    anyhow::anyhow!(
                        "--peer-label hash reads its key from {}: {e}; pass --peer-hash-key-file",
                        path.display()
                    )
                })?;
                if key.iter().all(u8::is_ascii_whitespace) {
                    anyhow::bail!("the peer hash key file {} is empty", path.display());
                }
                PeerLabel::Hash { key }
            }
        })
    }

    /// Ports whose server replies are read.
    pub fn plaintext_ports(&self) -> Vec<u16> {
        match &self.reply_ports {
            Some(explicit) => explicit.0.clone(),
            None => self.ports.0.iter().copied().filter(|p| [25, 587].contains(p)).collect(),
        }
    }

    /// Checks that need more than one flag.
    pub fn validate(&self) -> Result<(), String> {
        if self.ifaces.len() > MAX_IFACES {
            return Err(format!("{} interfaces given; at most {MAX_IFACES}", self.ifaces.len()));
        }
        for (i, name) in self.ifaces.iter().enumerate() {
            if self.ifaces[..i].contains(name) {
                return Err(format!("interface {name} is given twice"));
            }
        }
        if let Some(explicit) = &self.reply_ports
            && let Some(p) = explicit.0.iter().find(|p| !self.ports.0.contains(p))
        {
            return Err(format!("--reply-ports lists {p}, which is not in --ports"));
        }
        if self.handshake_timeout.is_zero() {
            return Err("--handshake-timeout must be more than 0s".into());
        }
        if self.mode == Mode::Xdp && self.tc_link != TcLink::Auto {
            return Err("--tc-link applies to --mode tc only".into());
        }
        if self.mode == Mode::Tc && self.xdp_mode != XdpAttach::Auto {
            return Err("--xdp-mode applies to --mode xdp only".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_parse() {
        assert_eq!(parse_ports("25,465,587").unwrap().0, vec![25, 465, 587]);
        assert_eq!(parse_ports(" 2525 , 25").unwrap().0, vec![2525, 25]);
        for bad in ["", "25,", "x", "0", "65536", "25,25", "-1", "25;587"] {
            assert!(parse_ports(bad).is_err(), "{bad:?} accepted");
        }
        let sixteen: Vec<String> = (1..=16).map(|p: u16| p.to_string()).collect();
        assert_eq!(parse_ports(&sixteen.join(",")).unwrap().0.len(), 16);
        let seventeen: Vec<String> = (1..=17).map(|p: u16| p.to_string()).collect();
        assert!(parse_ports(&seventeen.join(",")).unwrap_err().contains("at most 16"));
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("1s").unwrap(), Duration::from_secs(1));
        assert_eq!(parse_duration("10s").unwrap(), Duration::from_secs(10));
        assert!(parse_duration("10").is_err());
        assert!(parse_interval("1ms").is_err());
    }

    #[test]
    fn diagnose_flags() {
        let cli =
            Cli::try_parse_from(["smtpflow", "diagnose", "-i", "eth0", "--for", "3s", "--json"])
                .unwrap();
        let Command::Diagnose(d) = cli.command else { panic!("diagnose") };
        assert_eq!((d.duration, d.json), (Duration::from_secs(3), true));
        assert_eq!((d.observe.min_failures, d.observe.min_zero_windows), (10, 10));
        assert_eq!((d.observe.min_share, d.observe.conntrack_fill), (0.1, 0.9));
        for (share, ok) in
            [("0", true), ("0.25", true), ("1", true), ("1.5", false), ("-0.1", false)]
        {
            let r = Cli::try_parse_from(["smtpflow", "diagnose", "-i", "a", "--min-share", share]);
            assert_eq!(r.is_ok(), ok, "--min-share {share}");
        }
        assert!(
            Cli::try_parse_from(["smtpflow", "diagnose", "-i", "a", "--conntrack-fill", "1.5"])
                .is_err()
        );
        assert!(
            Cli::try_parse_from(["smtpflow", "diagnose", "-i", "a", "--min-failures", "0"])
                .is_err()
        );
        // Watch-only flags are not diagnose's.
        assert!(
            Cli::try_parse_from(["smtpflow", "diagnose", "-i", "a", "--metrics-addr", "1.2.3.4:1"])
                .is_err()
        );
    }

    #[test]
    fn log_level_is_global_and_optional() {
        let cli = Cli::try_parse_from(["smtpflow", "watch", "-i", "eth0"]).unwrap();
        assert_eq!(cli.log_level, None, "RUST_LOG decides when the flag is absent");
        for (i, args) in [
            ["smtpflow", "--log-level", "debug", "watch", "-i", "eth0"],
            ["smtpflow", "watch", "-i", "eth0", "--log-level", "debug"],
        ]
        .into_iter()
        .enumerate()
        {
            let cli = Cli::try_parse_from(args).unwrap();
            assert_eq!(cli.log_level.map(LogLevel::filter), Some(log::LevelFilter::Debug), "{i}");
        }
        assert!(Cli::try_parse_from(["smtpflow", "--log-level", "loud", "check"]).is_err());
    }

    #[test]
    fn watch_flags() {
        let cli =
            Cli::try_parse_from(["smtpflow", "watch", "--iface", "eth0", "-i", "eth1"]).unwrap();
        let Command::Watch(w) = cli.command else { panic!("watch") };
        assert_eq!(w.window, Duration::from_secs(60));
        let w = w.observe;
        assert_eq!(w.ifaces, ["eth0", "eth1"]);
        assert_eq!(w.mode, Mode::Tc);
        assert_eq!(w.ports.0, vec![25, 465, 587]);
        assert_eq!(w.max_peers, 65536);
        assert_eq!(w.interval, Duration::from_secs(1));
        assert_eq!(w.max_flows, 262_144);
        assert_eq!(w.handshake_timeout, Duration::from_secs(5));
        assert_eq!(w.plaintext_ports(), vec![25, 587]);
        assert!(w.validate().is_ok());
        let odd =
            Cli::try_parse_from(["smtpflow", "watch", "-i", "a", "--reply-ports", "2525"]).unwrap();
        let Command::Watch(WatchArgs { observe: w, .. }) = odd.command else { panic!("watch") };
        assert!(w.validate().unwrap_err().contains("not in --ports"));
        let none =
            Cli::try_parse_from(["smtpflow", "watch", "-i", "a", "--reply-ports", ""]).unwrap();
        let Command::Watch(WatchArgs { observe: w, .. }) = none.command else { panic!("watch") };
        assert!(w.plaintext_ports().is_empty() && w.validate().is_ok());
        let custom =
            Cli::try_parse_from(["smtpflow", "watch", "-i", "a", "--ports", "2525,587"]).unwrap();
        let Command::Watch(WatchArgs { observe: w, .. }) = custom.command else { panic!("watch") };
        assert_eq!(w.plaintext_ports(), vec![587]);
        assert!(w.validate().is_ok());
        assert!(Cli::try_parse_from(["smtpflow", "watch"]).is_err());
        let dup = Cli::try_parse_from(["smtpflow", "watch", "-i", "a", "-i", "a"]).unwrap();
        let Command::Watch(WatchArgs { observe: w, .. }) = dup.command else { panic!("watch") };
        assert!(w.validate().is_err());
    }
}
