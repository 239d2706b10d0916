//! Every name the tests look up in smtpflow's output, in one place: metric families, and the
//! kernel programs as they show up hooked to an interface (from `smtpflow-common`, where the
//! kernel and the loader take them too).
pub use smtpflow_common::names::{
    PROG_TC_EGRESS as TC_OUT, PROG_TC_INGRESS as TC_IN, PROG_XDP as XDP,
};

/// The prefix of every program smtpflow loads (and of every metric it exports).
pub const PREFIX: &str = "smtpflow_";

// TCP events and handshakes.
pub const EVENTS: &str = "smtpflow_tcp_events_total";
pub const PEER_EVENTS: &str = "smtpflow_peer_tcp_events_total";
pub const HANDSHAKES: &str = "smtpflow_handshakes_total";
pub const PEER_HANDSHAKES: &str = "smtpflow_peer_handshakes_total";
pub const RETRANSMITS: &str = "smtpflow_syn_retransmits_total";
pub const RESETS: &str = "smtpflow_resets_total";
pub const DROPS: &str = "smtpflow_syn_drops_total";
pub const UNREACHABLE: &str = "smtpflow_unreachable_total";
pub const HS_BUCKET: &str = "smtpflow_handshake_duration_seconds_bucket";
pub const HS_COUNT: &str = "smtpflow_handshake_duration_seconds_count";
pub const HS_SUM: &str = "smtpflow_handshake_duration_seconds_sum";

// SMTP replies.
pub const REPLIES: &str = "smtpflow_smtp_replies_total";
pub const GREETINGS: &str = "smtpflow_smtp_greetings_total";
pub const PEER_GREETINGS: &str = "smtpflow_peer_smtp_greetings_total";
pub const GREET_BUCKET: &str = "smtpflow_greeting_duration_seconds_bucket";
pub const GREET_COUNT: &str = "smtpflow_greeting_duration_seconds_count";

// What the replies say (enhanced status codes, throttling, STARTTLS).
pub const REPLY_STATUSES: &str = "smtpflow_smtp_reply_statuses_total";
pub const THROTTLED: &str = "smtpflow_throttled_sessions_total";
pub const STARTTLS: &str = "smtpflow_starttls_total";
pub const PEER_THROTTLED: &str = "smtpflow_peer_throttled_sessions_total";
pub const TLS_VERSIONS: &str = "smtpflow_tls_versions_total";

// Open connections (gauges).
pub const OPEN: &str = "smtpflow_open_connections";
pub const PEER_OPEN: &str = "smtpflow_peer_open_connections";

// Host pressure.
pub const CT_STAT: &str = "smtpflow_conntrack_stat_total";
pub const CT_ENTRIES: &str = "smtpflow_conntrack_entries";
pub const CT_LIMIT: &str = "smtpflow_conntrack_entries_limit";
pub const TCP_STAT: &str = "smtpflow_tcp_stat_total";
pub const LISTEN_QUEUE_LENGTH: &str = "smtpflow_listen_queue_length";
pub const LISTEN_QUEUE_LIMIT: &str = "smtpflow_listen_queue_limit";

// The diagnosis.
pub const DIAGNOSIS: &str = "smtpflow_diagnosis";
pub const EVIDENCE: &str = "smtpflow_diagnosis_evidence";
pub const TOP_PEER: &str = "smtpflow_diagnosis_top_peer";

// smtpflow itself: health, maps, peers.
pub const MALFORMED: &str = "smtpflow_malformed_packets_total";
pub const LOST: &str = "smtpflow_lost_events_total";
pub const PAYLOADS_LOST: &str = "smtpflow_payload_events_lost_total";
pub const BUILD_INFO: &str = "smtpflow_build_info";
pub const DRAIN_DURATION: &str = "smtpflow_drain_duration_seconds";
pub const INTERFACE_UP: &str = "smtpflow_interface_up";
pub const MAP_ENTRIES: &str = "smtpflow_map_entries";
pub const MAP_CAPACITY: &str = "smtpflow_map_capacity";
pub const MAP_EVICTIONS: &str = "smtpflow_map_evictions_total";
pub const PEERS_TRACKED: &str = "smtpflow_peers_tracked";
pub const PEERS_EXPORTED: &str = "smtpflow_peers_exported";
pub const PEER_INSERT_FAILURES: &str = "smtpflow_peer_insert_failures_total";
pub const FLOW_INSERT_FAILURES: &str = "smtpflow_flow_insert_failures_total";
pub const PROGRAM_RUNS: &str = "smtpflow_ebpf_program_runs_total";
pub const PROGRAM_RUN_SECONDS: &str = "smtpflow_ebpf_program_run_seconds_total";
pub const FULL_DRAIN_DURATION: &str = "smtpflow_full_drain_duration_seconds";
pub const PEERS_READ_TIMESTAMP: &str = "smtpflow_peers_read_timestamp_seconds";
pub const ATTACHMENT_INFO: &str = "smtpflow_attachment_info";

// Per-site series (remote names' registrable domains, or --site-map sites).
pub const SITE_HANDSHAKES: &str = "smtpflow_site_handshakes_total";
pub const SITE_REPLIES: &str = "smtpflow_site_smtp_replies_total";
pub const SITE_RESETS: &str = "smtpflow_site_resets_total";
pub const SITES_EXPORTED: &str = "smtpflow_sites_exported";
pub const SITE_OPEN: &str = "smtpflow_site_open_connections";
