//! The programs under test: each loaded alone from the real object, run on frames with
//! `BPF_PROG_TEST_RUN`, and the counters the contract covers read back.
use std::{collections::BTreeMap, fmt::Write as _};

use anyhow::Context as _;
use aya::{
    Ebpf,
    maps::{HashMap, MapData, PerCpuArray, RingBuf},
    programs::{SchedClassifier, TestRun as _, TestRunOptions, Xdp},
};
use smtpflow::{
    drain::{flows::FlowTable, totals::Totals},
    kernel::{self, Sizes},
};
use smtpflow_common::{
    Config, Counter, CounterKey, DEFAULT_MAX_PEERS, Direction, DropConfig, PeerCounters, PeerKey,
    PeerRecord, Side, Stat, names,
    peer::{PEER_EVENT_SLOTS, peer_counts},
    reference::{self, Effect},
};
use smtpflow_tests::frames::{ETH_P_IP, ETH_P_IPV6, hex};

use super::{PLAINTEXT, PORTS};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Hook {
    TcIn,
    TcOut,
    Xdp,
}

impl Hook {
    pub(crate) const ALL: [Hook; 3] = [Hook::TcIn, Hook::Xdp, Hook::TcOut];

    pub(crate) fn program(self) -> &'static str {
        match self {
            Hook::TcIn => names::PROG_TC_INGRESS,
            Hook::TcOut => names::PROG_TC_EGRESS,
            Hook::Xdp => names::PROG_XDP,
        }
    }

    pub(crate) fn side(self) -> Side {
        match self {
            Hook::TcIn | Hook::Xdp => Side::Peer,
            Hook::TcOut => Side::Local,
        }
    }

    /// The only verdict the programs may give: `TC_ACT_UNSPEC` (-1) or `XDP_PASS`.
    pub(crate) fn verdict(self) -> u32 {
        match self {
            Hook::TcIn | Hook::TcOut => u32::MAX,
            Hook::Xdp => 2,
        }
    }

    /// VLAN tags in metadata: none, for a test run builds its skb (or XDP buffer) from the bytes
    /// as given, tags included (`vlan_present` 0).
    pub(crate) fn stripped_tags(self) -> usize {
        0
    }
}

/// What the counters the contract covers say, in one copy of the object.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Counts {
    /// `COUNTERS` keys of [`Counter::Event`], summed over CPUs (zeros left out).
    pub(crate) events: BTreeMap<CounterKey, u64>,
    /// `STATS[Malformed]`, summed over CPUs.
    pub(crate) malformed: u64,
    /// `PEERS` event counts (outcomes are the flow tracker's, not compared); all-zero left out.
    pub(crate) peers: BTreeMap<PeerKey, [u64; PEER_EVENT_SLOTS]>,
}

impl Counts {
    /// Adds what the reference says one frame does.
    pub(crate) fn add(&mut self, e: &Effect) {
        match e {
            Effect::Malformed(_) => self.malformed += 1,
            Effect::Nothing => {}
            Effect::Counted(c) => {
                *self.events.entry(c.counter).or_default() += 1;
                self.peers.entry(c.peer).or_default()[c.peer_slot] += 1;
            }
        }
    }

    pub(crate) fn describe(&self) -> String {
        let mut s = format!("malformed {}", self.malformed);
        for (k, v) in &self.events {
            write!(s, "; {} {v}", event_key(k)).unwrap();
        }
        for (k, v) in &self.peers {
            write!(s, "; peer {} {v:?}", peer_key(k)).unwrap();
        }
        s
    }
}

pub(crate) fn event_key(k: &CounterKey) -> String {
    match k.decode() {
        Some((scope, Counter::Event(event, side))) => format!(
            "if{} {} {} {} side={}",
            scope.ifindex,
            scope.direction.label(),
            scope.port,
            event.label(),
            side.label()
        ),
        other => format!("{other:?}"),
    }
}

pub(crate) fn peer_key(k: &PeerKey) -> String {
    let ip = k.ip().map_or_else(|| format!("family {}", k.family), |ip| ip.to_string());
    let direction = Direction::from_repr(k.direction).map_or("?", Direction::label);
    format!("if{} {ip} {direction} {}", k.ifindex, k.port)
}

/// One program loaded from the real object, with the maps the comparison reads.
pub(crate) struct Kernel {
    pub(crate) hook: Hook,
    pub(crate) ebpf: Ebpf,
    /// The exact counters, read as the drain reads them.
    pub(crate) counters: Totals,
    pub(crate) peers: HashMap<MapData, PeerKey, PeerCounters>,
    /// With `--peer-counts log`: the per-peer log, read instead of `peers`.
    pub(crate) peer_log: Option<RingBuf<MapData>>,
    pub(crate) stats: PerCpuArray<MapData, u64>,
    /// The flow table, which the ICMP cases fill with the attempts their messages answer.
    pub(crate) flows: FlowTable,
    /// Counts read last (events and malformed are cumulative; peers are emptied on read).
    pub(crate) last: Counts,
}

impl Kernel {
    /// Loads the object as `smtpflow watch` does (the same globals; drop reasons off), with only
    /// `hook`'s program, not attached.
    pub(crate) fn load(hook: Hook) -> anyhow::Result<Self> {
        Self::load_as(hook, false)
    }

    /// [`Self::load`], the per-peer counts going through the per-peer log when `log`
    /// (`--peer-counts log`).
    pub(crate) fn load_as(hook: Hook, log: bool) -> anyhow::Result<Self> {
        let mut config = Config::from_ports(PORTS, PLAINTEXT).context("ports")?;
        config.peer_log = if log { peer_counts::LOG } else { peer_counts::MAP };
        // The test run's device in the first slot: the path compared in place.
        config.set_ifaces(&[lo_ifindex()]).context("interfaces")?;
        // Flows are not compared; a smaller map than the default keeps three copies light.
        let sizes = Sizes { max_peers: DEFAULT_MAX_PEERS, max_flows: 65_536 };
        let mut ebpf = kernel::load(&config, &DropConfig::DISABLED, &sizes, 0)?;
        let name = hook.program();
        let prog = ebpf.program_mut(name).with_context(|| format!("no program {name}"))?;
        match hook {
            Hook::TcIn | Hook::TcOut => {
                let p: &mut SchedClassifier = prog.try_into()?;
                p.load().with_context(|| format!("loading {name}"))?;
            }
            Hook::Xdp => {
                let p: &mut Xdp = prog.try_into()?;
                p.load().with_context(|| format!("loading {name}"))?;
            }
        }
        let mut take = |map: &str| ebpf.take_map(map).with_context(|| format!("no map {map}"));
        let peers = take(names::MAP_PEERS)?.try_into()?;
        let peer_log = if log { Some(take(names::MAP_PEER_LOG)?.try_into()?) } else { None };
        let stats = take(names::MAP_STATS)?.try_into()?;
        let flows = FlowTable::take(&mut ebpf, config.flow_seed)?;
        let counters = Totals::take(&mut ebpf, &config)?;
        Ok(Self { hook, ebpf, counters, peers, peer_log, stats, flows, last: Counts::default() })
    }

    /// One test run of `frame`; the program's return value, or `None` when a TC test run
    /// refuses the frame (see [`tc_refuses`]).
    pub(crate) fn run(&self, frame: &[u8]) -> anyhow::Result<Option<u32>> {
        match self.run_anyway(frame) {
            Ok(v) => Ok(Some(v)),
            Err(e) if self.hook != Hook::Xdp && tc_refuses(frame) && is_einval(&e) => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub(crate) fn run_anyway(&self, frame: &[u8]) -> anyhow::Result<u32> {
        let opts = TestRunOptions { data_in: Some(frame), repeat: 1, ..TestRunOptions::default() };
        let prog = self.ebpf.program(self.hook.program()).context("program")?;
        let result = match self.hook {
            Hook::TcIn | Hook::TcOut => {
                let p: &SchedClassifier = prog.try_into()?;
                p.test_run(opts)
            }
            Hook::Xdp => {
                let p: &Xdp = prog.try_into()?;
                p.test_run(opts)
            }
        };
        let result = result.with_context(|| {
            format!("{:?}: test run of a {}-byte frame:\n{}", self.hook, frame.len(), hex(frame))
        })?;
        Ok(result.return_value)
    }

    /// Event totals and malformed count so far; per-peer counts since the last read, after
    /// which `PEERS` is emptied.
    pub(crate) fn read(&mut self) -> anyhow::Result<Counts> {
        let mut c = Counts::default();
        for (k, sum) in self.counters.read_keys()? {
            if !matches!(k.decode(), Some((_, Counter::Event(..)))) {
                continue;
            }
            if sum != 0 {
                c.events.insert(k, sum);
            }
        }
        c.malformed = self.stats.get(&(Stat::Malformed as u32), 0)?.iter().sum();
        let mut logged: BTreeMap<PeerKey, PeerCounters> = BTreeMap::new();
        if let Some(log) = &mut self.peer_log {
            // The map stays empty.
            add_up_peer_log(log, &mut logged)?;
        }
        let keys: Vec<PeerKey> = self.peers.keys().collect::<Result<_, _>>()?;
        anyhow::ensure!(
            self.peer_log.is_none() || keys.is_empty(),
            "--peer-counts log: the per-peer map has {} entries",
            keys.len()
        );
        for k in keys {
            logged.insert(k, self.peers.get(&k, 0)?);
            self.peers.remove(&k)?;
        }
        for (k, v) in logged {
            if v.counts.iter().any(|&n| n != 0) {
                c.peers.insert(k, v.counts);
            }
        }
        Ok(c)
    }

    /// What happened since the last call: event and malformed deltas, and the peers.
    pub(crate) fn delta(&mut self) -> anyhow::Result<Counts> {
        let now = self.read()?;
        let mut d = Counts { peers: now.peers.clone(), ..Counts::default() };
        d.malformed = now.malformed - self.last.malformed;
        for (k, &v) in &now.events {
            let before = self.last.events.get(k).copied().unwrap_or(0);
            if v != before {
                d.events.insert(*k, v - before);
            }
        }
        self.last = Counts { peers: BTreeMap::new(), ..now };
        Ok(d)
    }

    /// Runs one frame on its own and returns exactly what it changed (and the verdict); `None`
    /// when the test run refuses the frame.
    pub(crate) fn observe(&mut self, frame: &[u8]) -> anyhow::Result<Option<(u32, Counts)>> {
        self.delta()?;
        let Some(verdict) = self.run(frame)? else { return Ok(None) };
        Ok(Some((verdict, self.delta()?)))
    }
}

/// Reads the per-peer log to its end and adds its records up per peer into `into`, as
/// smtpflow's table adds them ([`PeerCounters::add_record`]).
pub(crate) fn add_up_peer_log(
    log: &mut RingBuf<MapData>,
    into: &mut BTreeMap<PeerKey, PeerCounters>,
) -> anyhow::Result<()> {
    while let Some(item) = log.next() {
        anyhow::ensure!(item.len() == size_of::<PeerRecord>(), "a {}-byte record", item.len());
        // SAFETY: exactly a PeerRecord's bytes; any bit pattern is valid.
        let r = unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<PeerRecord>()) };
        into.entry(r.peer).or_default().add_record(&r);
    }
    Ok(())
}

/// Frames a TC test run may refuse (`EINVAL`; Linux 6.18 does): `BPF_PROG_TEST_RUN` on an skb
/// program wants the whole network header of an IPv4 or IPv6 ethertype (the outer one, as
/// `eth_type_trans` reads it) in the data. A real TC hook does see such frames; where the test
/// run refuses them they go through XDP only.
pub(crate) fn tc_refuses(frame: &[u8]) -> bool {
    let ethertype = u16::from_be_bytes([frame[12], frame[13]]);
    (ethertype == ETH_P_IP && frame.len() < 14 + 20)
        || (ethertype == ETH_P_IPV6 && frame.len() < 14 + 40)
}

pub(crate) fn is_einval(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>().is_some_and(|io| io.raw_os_error() == Some(libc::EINVAL))
    })
}

pub(crate) fn lo_ifindex() -> u32 {
    // SAFETY: a valid NUL-terminated name.
    let i = unsafe { libc::if_nametoindex(c"lo".as_ptr()) };
    assert!(i != 0, "no loopback interface");
    i
}

/// What `frame` must do when run through `hook` with `BPF_PROG_TEST_RUN` (whose skb or XDP
/// buffer is on the loopback device): the reference classifier's effect.
pub(crate) fn expected(hook: Hook, frame: &[u8], ifindex: u32) -> Effect {
    reference::effect(frame, hook.stripped_tags(), hook.side(), ifindex, PORTS)
}

pub(crate) fn counts_of(e: &Effect) -> Counts {
    let mut c = Counts::default();
    c.add(e);
    c
}

pub(crate) fn kernel_available() -> bool {
    if kernel::object().is_err() {
        smtpflow_tests::report::skipped(
            &smtpflow_tests::report::current_test(),
            "built with AYA_BUILD_SKIP=1: no kernel object to test",
        );
        return false;
    }
    true
}
