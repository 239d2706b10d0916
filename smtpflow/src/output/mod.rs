//! What smtpflow says: the Prometheus text ([`metrics`], with the process's own figures from
//! [`selfstats`]), served over HTTP ([`http`], secured by [`web_config`]), the live console view
//! and log lines ([`console`]), and how peers are named in all of them ([`peer_label`]).
pub mod console;
pub mod families;
pub mod http;
pub mod metrics;
pub mod peer_label;
pub mod selfstats;
pub mod web_config;
