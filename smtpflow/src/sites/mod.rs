//! Sites: who a remote is, by name. The kernel copies a few clear-text bytes per session
//! (the greeting, the client's EHLO, the EHLO reply); [`names`] reads a host name out of them,
//! [`map`] turns a name (or, with `--site-map`, an address) into a site, and [`attribute`] gives
//! the per-peer counters of each full read of the per-peer maps to the peers' sites, into a
//! bounded set of per-site series (`smtpflow_site_*`).
pub mod attribute;
pub mod map;
pub mod names;

pub use attribute::{SiteCounted, SiteOpen, SiteSeries, SiteView, Sites};
pub use map::SiteMap;
