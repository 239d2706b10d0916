//! `--web.config.file`: TLS and basic auth for the metrics endpoint, in the file format
//! Prometheus exporters share (the exporter-toolkit's):
//!
//! ```yaml
//! tls_server_config:
//!   cert_file: server.crt        # relative paths are relative to this file
//!   key_file: server.key
//!   client_ca_file: ca.crt       # optional: verify client certificates
//!   client_auth_type: RequireAndVerifyClientCert   # or VerifyClientCertIfGiven, NoClientCert
//!   min_version: TLS12           # or TLS13
//! basic_auth_users:
//!   prometheus: $2y$10$...       # bcrypt hashes (htpasswd -nBC 10 "" | tr -d ':\n')
//! ```
use std::{
    collections::{BTreeMap, HashSet},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use anyhow::{Context as _, bail};
use base64::Engine as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};
use tokio_rustls::{
    TlsAcceptor,
    rustls::{self, RootCertStore, ServerConfig, server::WebPkiClientVerifier},
};
use yaml_rust2::{Yaml, YamlLoader};

/// What the web config file asks for.
pub struct WebConfig {
    pub tls: Option<TlsAcceptor>,
    pub auth: Option<BasicAuth>,
}

impl WebConfig {
    /// No file: plain HTTP, no authentication.
    pub fn none() -> Self {
        Self { tls: None, auth: None }
    }

    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the web config file {}", path.display()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::parse(&text, base)
            .with_context(|| format!("in the web config file {}", path.display()))
    }

    pub fn parse(text: &str, base: &Path) -> anyhow::Result<Self> {
        let docs = YamlLoader::load_from_str(text).context("not valid YAML")?;
        let Some(doc) = docs.into_iter().next() else {
            return Ok(Self::none());
        };
        let top = match doc {
            Yaml::Hash(h) => h,
            Yaml::Null => return Ok(Self::none()),
            _ => bail!("the file must be a mapping"),
        };
        let mut tls = None;
        let mut auth = None;
        for (k, v) in top {
            match k.as_str() {
                Some("tls_server_config") => tls = Some(tls_acceptor(&v, base)?),
                Some("basic_auth_users") => auth = Some(BasicAuth::from_yaml(&v)?),
                // Response headers and HTTP/2 settings: nothing smtpflow needs to act on.
                Some("http_server_config") => {
                    log::warn!("web config: http_server_config is ignored")
                }
                Some(other) => bail!(
                    "unknown key {other} (smtpflow reads tls_server_config and basic_auth_users)"
                ),
                None => bail!("keys must be strings"),
            }
        }
        Ok(Self { tls, auth })
    }
}

fn string_map(v: &Yaml, what: &str) -> anyhow::Result<BTreeMap<String, String>> {
    let Yaml::Hash(h) = v else {
        bail!("{what} must be a mapping");
    };
    h.iter()
        .map(|(k, v)| match (k.as_str(), v.as_str()) {
            (Some(k), Some(v)) => Ok((k.to_owned(), v.to_owned())),
            (Some(k), None) => bail!("{what}.{k}: smtpflow reads only string values here"),
            (None, _) => bail!("{what}: keys must be strings"),
        })
        .collect()
}

fn tls_acceptor(v: &Yaml, base: &Path) -> anyhow::Result<TlsAcceptor> {
    let mut cfg = string_map(v, "tls_server_config")?;
    let path = |p: String| -> PathBuf { base.join(p) };
    let cert = cfg.remove("cert_file").map(path).context("tls_server_config needs cert_file")?;
    let key = cfg.remove("key_file").map(path).context("tls_server_config needs key_file")?;
    let client_ca = cfg.remove("client_ca_file").map(path);
    let client_auth = cfg.remove("client_auth_type").unwrap_or_else(|| "NoClientCert".into());
    let versions: &[&'static rustls::SupportedProtocolVersion] =
        match cfg.remove("min_version").as_deref() {
            None | Some("TLS12") => &[&rustls::version::TLS13, &rustls::version::TLS12],
            Some("TLS13") => &[&rustls::version::TLS13],
            Some(other) => bail!("min_version {other:?}: smtpflow supports TLS12 and TLS13"),
        };
    if let Some(k) = cfg.keys().next() {
        bail!("unknown tls_server_config key {k:?}");
    }
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cert)
        .with_context(|| format!("reading {}", cert.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("parsing the certificates in {}", cert.display()))?;
    if certs.is_empty() {
        bail!("no certificate in {}", cert.display());
    }
    let key = PrivateKeyDer::from_pem_file(&key)
        .with_context(|| format!("reading the private key {}", key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions)
        .context("TLS protocol versions")?;
    let builder = match (client_auth.as_str(), client_ca) {
        ("NoClientCert", _) => builder.with_no_client_auth(),
        (mode @ ("RequireAndVerifyClientCert" | "VerifyClientCertIfGiven"), Some(ca)) => {
            let mut roots = RootCertStore::empty();
            for c in CertificateDer::pem_file_iter(&ca)
                .with_context(|| format!("reading {}", ca.display()))?
            {
                roots
                    .add(c.context("a client CA certificate")?)
                    .context("a client CA certificate")?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            let verifier = if mode == "VerifyClientCertIfGiven" {
                verifier.allow_unauthenticated()
            } else {
                verifier
            };
            builder.with_client_cert_verifier(
                verifier.build().context("the client certificate verifier")?,
            )
        }
        (mode @ ("RequireAndVerifyClientCert" | "VerifyClientCertIfGiven"), None) => {
            bail!("client_auth_type {mode} needs client_ca_file")
        }
        (other, _) => bail!(
            "client_auth_type {other:?} is not supported (RequireAndVerifyClientCert, VerifyClientCertIfGiven, NoClientCert)"
        ),
    };
    let config =
        builder.with_single_cert(certs, key).context("the certificate and key do not match")?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// HTTP basic authentication against bcrypt hashes. A verified `Authorization` value is
/// remembered (bcrypt is slow on purpose; a scrape every few seconds must not pay it each time).
pub struct BasicAuth {
    users: BTreeMap<String, String>,
    verified: Mutex<HashSet<String>>,
}

/// How many verified credentials are remembered before the cache starts over.
const VERIFIED_CACHE: usize = 256;

impl BasicAuth {
    fn from_yaml(v: &Yaml) -> anyhow::Result<Self> {
        let users = string_map(v, "basic_auth_users")?;
        for (user, hash) in &users {
            if !hash.starts_with("$2") {
                bail!(
                    "basic_auth_users.{user} is not a bcrypt hash (make one with `htpasswd -nBC 10 \"\" | tr -d ':\\n'`)"
                );
            }
        }
        Ok(Self { users, verified: Mutex::new(HashSet::new()) })
    }

    /// Whether an `Authorization` header value carries valid credentials.
    pub fn allows(&self, header: Option<&str>) -> bool {
        let Some(value) = header else { return false };
        if self.verified.lock().is_ok_and(|v| v.contains(value)) {
            return true;
        }
        let Some(encoded) = value.strip_prefix("Basic ") else { return false };
        let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(encoded.trim()) else {
            return false;
        };
        let Ok(text) = String::from_utf8(decoded) else { return false };
        let Some((user, password)) = text.split_once(':') else { return false };
        let ok = self
            .users
            .get(user)
            .is_some_and(|hash| bcrypt::verify(password, hash).unwrap_or(false));
        if ok && let Ok(mut v) = self.verified.lock() {
            if v.len() >= VERIFIED_CACHE {
                v.clear();
            }
            v.insert(value.to_owned());
        }
        ok
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(user: &str, pass: &str) -> String {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
        )
    }

    #[test]
    fn basic_auth_checks_bcrypt() {
        let hash = bcrypt::hash("s3cret", 4).unwrap();
        let cfg =
            WebConfig::parse(&format!("basic_auth_users:\n  prom: '{hash}'\n"), Path::new("."))
                .unwrap();
        let auth = cfg.auth.unwrap();
        assert!(auth.allows(Some(&header("prom", "s3cret"))));
        assert!(auth.allows(Some(&header("prom", "s3cret"))), "cached");
        assert!(!auth.allows(Some(&header("prom", "wrong"))));
        assert!(!auth.allows(Some(&header("other", "s3cret"))));
        assert!(!auth.allows(Some("Bearer x")));
        assert!(!auth.allows(Some("Basic !!!")));
        assert!(!auth.allows(None));
    }

    #[test]
    fn mistakes_are_named() {
        let e = |t: &str| {
            WebConfig::parse(t, Path::new(".")).err().map(|e| format!("{e:#}")).unwrap_or_default()
        };
        assert!(e("tls_config:\n  a: b\n").contains("unknown key"));
        assert!(e("basic_auth_users:\n  u: plain\n").contains("not a bcrypt hash"));
        assert!(e("tls_server_config:\n  key_file: k\n").contains("needs cert_file"));
        assert!(
            e("tls_server_config:\n  cert_file: /nonexistent.crt\n  key_file: k\n")
                .contains("/nonexistent.crt")
        );
        assert!(e("tls_server_config: [1]\n").contains("mapping"));
        assert!(e(": : :").contains("YAML") || !e(": : :").is_empty());
        assert!(WebConfig::parse("", Path::new(".")).unwrap().tls.is_none());
    }
}
