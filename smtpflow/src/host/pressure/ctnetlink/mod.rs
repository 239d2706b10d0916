//! A small `NETLINK_NETFILTER` client for ctnetlink's statistics: the per-CPU counters
//! (`IPCTNL_MSG_CT_GET_STATS_CPU`, a dump with one message per possible CPU) and the table fill
//! (`IPCTNL_MSG_CT_GET_STATS`: entries, and the limit on kernels that send it). This works where
//! a kernel is built without `/proc/net/stat/nf_conntrack`.
//!
//! The byte-level work is pure functions ([`request`], [`parse_cpu_stats_reply`],
//! [`parse_global_reply`], [`parse_attrs`]); [`Socket`] only sends and receives, through
//! [`super::netlink`], which also walks the netlink messages of a reply.
mod wire;

use std::{collections::BTreeMap, io};

pub use super::netlink::NlError;
use super::netlink::{self, NLM_F_ACK, NLM_F_DUMP};
pub use wire::*;
use wire::{Scan, scan};

/// An open `NETLINK_NETFILTER` socket, in the network namespace it was opened in.
pub struct Socket(netlink::Socket);

impl Socket {
    pub fn open() -> io::Result<Self> {
        netlink::Socket::open(libc::NETLINK_NETFILTER).map(Self)
    }

    /// Sends one request and collects the kernel's datagrams until the reply is complete.
    /// Returns the request's sequence number and the reply bytes.
    fn transact(&mut self, msg: u8, flags: u16) -> Result<(u32, Vec<u8>), NlError> {
        let seq = self.0.next_seq();
        let reply = self.0.transact(&request(msg, flags, seq), |r| {
            Ok(matches!(scan(r, seq, msg)?, Scan::Complete(_)))
        })?;
        Ok((seq, reply))
    }

    /// The per-CPU statistics, summed.
    pub fn cpu_stats(&mut self) -> Result<BTreeMap<&'static str, u64>, NlError> {
        let (seq, reply) = self.transact(IPCTNL_MSG_CT_GET_STATS_CPU, NLM_F_DUMP)?;
        parse_cpu_stats_reply(&reply, seq)
    }

    /// Entries in the table, and its limit where the kernel sends it.
    pub fn global(&mut self) -> Result<Global, NlError> {
        let (seq, reply) = self.transact(IPCTNL_MSG_CT_GET_STATS, NLM_F_ACK)?;
        parse_global_reply(&reply, seq)
    }
}
