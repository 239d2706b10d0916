//! Preparing the `kfree_skb` drop-reason program: the kernel-structure offsets it reads, found in
//! this kernel's BTF, and the names of the drop reasons, from BTF too (their numbering differs
//! between kernels, so no table is hard-coded).
use std::{collections::HashMap, os::unix::fs::MetadataExt as _};

use anyhow::Context as _;
use smtpflow_common::{DropConfig, LISTEN_OVERFLOW_CODE};

use super::btf::Btf;

/// Drop reason names by value, without the `SKB_DROP_REASON_` prefix.
#[derive(Debug, Clone, Default)]
pub struct DropReasons(HashMap<u16, String>);

impl DropReasons {
    pub fn name(&self, value: u16) -> String {
        match self.0.get(&value) {
            Some(name) => name.clone(),
            None if value == LISTEN_OVERFLOW_CODE => "TCP_LISTEN_OVERFLOW".to_owned(),
            None => format!("reason_{value}"),
        }
    }

    /// The value of a reason, by name.
    pub fn value(&self, name: &str) -> Option<u16> {
        self.0.iter().find(|(_, n)| *n == name).map(|(v, _)| *v)
    }
}

fn offset(btf: &Btf, ty: &str, member: &str) -> anyhow::Result<u32> {
    btf.member_offset(ty, member).with_context(|| format!("BTF has no {ty}.{member}"))
}

/// The program's configuration and the reason names, for the network namespace smtpflow runs
/// in. An error says what this kernel lacks; the caller carries on without drop reasons.
pub fn prepare() -> anyhow::Result<(DropConfig, DropReasons)> {
    let btf = Btf::from_sys_fs()?;
    let names = btf
        .enum_values("skb_drop_reason")
        .context("this kernel has no enum skb_drop_reason (drop reasons arrived in Linux 5.17)")?;
    let reasons = DropReasons(
        names
            .into_iter()
            .filter_map(|(v, n)| {
                let v = u16::try_from(v).ok()?;
                Some((v, n.trim_start_matches("SKB_DROP_REASON_").to_owned()))
            })
            .collect(),
    );
    let netns_inum = std::fs::metadata("/proc/self/ns/net")
        .context("reading this process's network namespace")?
        .ino() as u32;
    let config = DropConfig {
        enabled: 1,
        netns_inum,
        skb_head: offset(&btf, "sk_buff", "head")?,
        skb_network_header: offset(&btf, "sk_buff", "network_header")?,
        skb_dev: offset(&btf, "sk_buff", "dev")?,
        skb_sk: offset(&btf, "sk_buff", "sk")?,
        skb_iif: offset(&btf, "sk_buff", "skb_iif")?,
        dev_nd_net: offset(&btf, "net_device", "nd_net")? + offset(&btf, "possible_net_t", "net")?,
        sk_net: offset(&btf, "sock", "__sk_common")?
            + offset(&btf, "sock_common", "skc_net")?
            + offset(&btf, "possible_net_t", "net")?,
        net_ns_inum: offset(&btf, "net", "ns")? + offset(&btf, "ns_common", "inum")?,
        sk_ack_backlog: offset(&btf, "sock", "sk_ack_backlog")?,
        sk_max_ack_backlog: offset(&btf, "sock", "sk_max_ack_backlog")?,
        listen_overflow_reason: u32::from(
            reasons.value("TCP_LISTEN_OVERFLOW").unwrap_or(LISTEN_OVERFLOW_CODE),
        ),
    };
    Ok((config, reasons))
}
