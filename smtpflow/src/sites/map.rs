//! Sites of names and addresses: `--site-map FILE` rules first, else a name's registrable
//! domain from the public suffix list (the `psl` crate, compiled in: `mx3.mail.protection.
//! outlook.com` is `outlook.com`; a name under a suffix the list does not know gives its last
//! two labels).
//!
//! The file is a line per rule; `#` starts a comment; blank lines are skipped:
//!
//! ```text
//! # suffix <name suffix> <site>: names equal to the suffix or ending in .<suffix>
//! suffix outlook.com      microsoft
//! suffix protection.outlook.com microsoft
//! # cidr <prefix>/<len> <site>: peers with no name learnt yet (throttling greetings often
//! # carry none), and peers that never greet with a name
//! cidr 40.92.0.0/15       microsoft
//! cidr 2a01:111:f400::/48 microsoft
//! ```
//!
//! The longest matching suffix wins, and the longest matching prefix. Site names are 1 to 63
//! characters of `a-z A-Z 0-9 . _ -`, and not `unknown` or `other` (the two sites smtpflow
//! itself exports). At most [`MAX_RULES`] rules.
use std::{net::IpAddr, path::Path, sync::Arc};

use anyhow::{Context as _, bail};

/// Most rules a `--site-map` file may hold (lookups scan the CIDR rules).
pub const MAX_RULES: usize = 4096;
/// Longest site name in a `--site-map` file.
pub const MAX_SITE: usize = 63;
/// The site of peers with no name and no CIDR rule.
pub const UNKNOWN: &str = "unknown";
/// The sum of the sites beyond `--max-site-series`.
pub const OTHER: &str = "other";

/// The rules of a `--site-map` file (empty: registrable domains only).
#[derive(Clone, Debug, Default)]
pub struct SiteMap {
    /// `(suffix, site)`, longest suffix first.
    suffixes: Vec<(String, Arc<str>)>,
    /// `(network, prefix length, site)`, longest prefix first.
    cidrs: Vec<(IpAddr, u8, Arc<str>)>,
}

impl SiteMap {
    /// Reads a `--site-map` file; errors name the file and line.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the --site-map file {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("in the --site-map file {}", path.display()))
    }

    /// Parses the text of a `--site-map` file.
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let mut map = Self::default();
        for (n, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or_default().trim();
            if line.is_empty() {
                continue;
            }
            map.rule(line).with_context(|| format!("line {}: {line:?}", n + 1))?;
            if map.suffixes.len() + map.cidrs.len() > MAX_RULES {
                bail!("line {}: more than {MAX_RULES} rules", n + 1);
            }
        }
        map.suffixes.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.0.cmp(&b.0)));
        map.cidrs.sort_by_key(|c| std::cmp::Reverse(c.1));
        Ok(map)
    }

    fn rule(&mut self, line: &str) -> anyhow::Result<()> {
        let words: Vec<&str> = line.split_ascii_whitespace().collect();
        let [kind, what, site] = words[..] else {
            bail!("expected `suffix <name suffix> <site>` or `cidr <prefix>/<len> <site>`");
        };
        let site = site_name(site)?;
        match kind {
            "suffix" => {
                let suffix = what.trim_start_matches('.');
                let Some(s) =
                    super::names::hostname(suffix.as_bytes()).or_else(|| single_label(suffix))
                else {
                    bail!("{what:?} is not a host name suffix (LDH labels, e.g. outlook.com)");
                };
                self.suffixes.push((s, site));
            }
            "cidr" => {
                let (addr, len) = what.split_once('/').with_context(|| {
                    format!("{what:?} is not a prefix (write e.g. 40.92.0.0/15)")
                })?;
                let addr: IpAddr =
                    addr.parse().with_context(|| format!("{addr:?} is not an IP address"))?;
                let max = if addr.is_ipv4() { 32 } else { 128 };
                let len: u8 = len
                    .parse()
                    .ok()
                    .filter(|l| *l <= max)
                    .with_context(|| format!("{len:?} is not a prefix length (0-{max})"))?;
                self.cidrs.push((masked(addr, len), len, site));
            }
            other => bail!("{other:?} is not a rule (`suffix` or `cidr`)"),
        }
        Ok(())
    }

    /// The site of a host name (already checked by [`super::names::hostname`]).
    pub fn site_of_name(&self, name: &str) -> Arc<str> {
        for (suffix, site) in &self.suffixes {
            if name == suffix
                || (name.len() > suffix.len()
                    && name.ends_with(suffix.as_str())
                    && name.as_bytes()[name.len() - suffix.len() - 1] == b'.')
            {
                return site.clone();
            }
        }
        registrable(name).into()
    }

    /// The site a `cidr` rule gives an address, if any.
    pub fn site_of_addr(&self, addr: IpAddr) -> Option<Arc<str>> {
        let addr = canonical(addr);
        self.cidrs
            .iter()
            .find(|(net, len, _)| net.is_ipv4() == addr.is_ipv4() && masked(addr, *len) == *net)
            .map(|(_, _, site)| site.clone())
    }

    pub fn is_empty(&self) -> bool {
        self.suffixes.is_empty() && self.cidrs.is_empty()
    }
}

/// A single-label suffix rule (`suffix com big`): lowercase LDH.
fn single_label(s: &str) -> Option<String> {
    let ok = (1..=63).contains(&s.len())
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-');
    ok.then(|| s.to_ascii_lowercase())
}

/// A site name of a `--site-map` file, checked.
fn site_name(s: &str) -> anyhow::Result<Arc<str>> {
    let ok = (1..=MAX_SITE).contains(&s.len())
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if !ok {
        bail!("{s:?} is not a site name (1 to {MAX_SITE} of a-z A-Z 0-9 . _ -)");
    }
    if s == UNKNOWN || s == OTHER {
        bail!("{s:?} is reserved (smtpflow exports it itself)");
    }
    Ok(s.into())
}

/// The registrable domain of a host name (see the module's documentation): at most the name
/// itself, so a label value is at most [`super::names::MAX_NAME`] characters of the host name
/// alphabet.
pub fn registrable(name: &str) -> &str {
    if let Some(d) = psl::domain_str(name) {
        return d;
    }
    // A name that is itself a public suffix (`co.uk`): the name.
    let mut dots = name.rmatch_indices('.');
    match (dots.next(), dots.next()) {
        (Some(_), Some((i, _))) => &name[i + 1..],
        _ => name,
    }
}

/// IPv4-mapped IPv6 addresses as IPv4.
fn canonical(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(addr, IpAddr::V4),
        v4 => v4,
    }
}

fn masked(addr: IpAddr, len: u8) -> IpAddr {
    match addr {
        IpAddr::V4(a) => {
            let bits = u32::from(a);
            let mask = if len == 0 { 0 } else { u32::MAX << (32 - u32::from(len)) };
            IpAddr::V4((bits & mask).into())
        }
        IpAddr::V6(a) => {
            let bits = u128::from(a);
            let mask = if len == 0 { 0 } else { u128::MAX << (128 - u32::from(len)) };
            IpAddr::V6((bits & mask).into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registrable_domains() {
        let m = SiteMap::default();
        assert_eq!(&*m.site_of_name("mx3.mail.protection.outlook.com"), "outlook.com");
        assert_eq!(&*m.site_of_name("mx.example.co.uk"), "example.co.uk");
        assert_eq!(&*m.site_of_name("mx1.alpha.test"), "alpha.test", "unknown suffix");
        assert_eq!(&*m.site_of_name("co.uk"), "co.uk");
    }

    #[test]
    fn rules() {
        let m = SiteMap::parse(
            "# comment\n\nsuffix outlook.com microsoft\nsuffix protection.outlook.com ms-eop # eop\n\
             cidr 40.92.0.0/15 microsoft\ncidr 40.92.1.0/24 ms-24\ncidr 2a01:111:f400::/48 microsoft\n",
        )
        .expect("parses");
        assert_eq!(&*m.site_of_name("mx3.mail.protection.outlook.com"), "ms-eop", "longest");
        assert_eq!(&*m.site_of_name("smtp.outlook.com"), "microsoft");
        assert_eq!(&*m.site_of_name("outlook.com"), "microsoft");
        assert_eq!(&*m.site_of_name("notoutlook.com"), "notoutlook.com", "a label boundary");
        let site = |a: &str| m.site_of_addr(a.parse().expect("addr")).map(|s| s.to_string());
        assert_eq!(site("40.93.255.1").as_deref(), Some("microsoft"));
        assert_eq!(site("40.92.1.9").as_deref(), Some("ms-24"));
        assert_eq!(site("::ffff:40.92.1.9").as_deref(), Some("ms-24"));
        assert_eq!(site("2a01:111:f400:1::1").as_deref(), Some("microsoft"));
        assert_eq!(site("192.0.2.1"), None);
    }

    #[test]
    fn errors_name_the_line() {
        for (text, line) in [
            ("suffix outlook.com\n", "line 1"),
            ("\nsuffix outlook.com micro soft\n", "line 2"),
            ("cidr 40.92.0.0 microsoft\n", "line 1"),
            ("cidr 40.92.0.0/33 microsoft\n", "line 1"),
            ("cidr example/8 microsoft\n", "line 1"),
            ("suffix outlook.com other\n", "line 1"),
            ("suffix outlook.com mi{c}ro\n", "line 1"),
            ("suffix out_look.com microsoft\n", "line 1"),
            ("domain outlook.com microsoft\n", "line 1"),
        ] {
            let e = format!("{:#}", SiteMap::parse(text).expect_err(text));
            assert!(e.contains(line), "{text:?}: {e}");
        }
    }
}
