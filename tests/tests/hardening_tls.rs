//! The hardening contract, part 2: TLS and basic auth through `--web.config.file` (checked with
//! curl), client certificates, and a bad file refused before anything is attached; against the
//! real `smtpflow watch` binary in test-owned namespaces.
use std::time::Duration;

use smtpflow_tests::{
    Metrics, Pair,
    expect::{counters, inbound_only},
    hooks::{assert_unhooked, assert_unhooked_within},
    http::curl,
    names::{BUILD_INFO, PREFIX},
    netfilter::RstOracle,
    pki::Pki,
    require_root,
    smtpflow::{self, METRICS_ADDR, run_watch},
    traffic::inbound,
};

const SF0: &str = Pair::LOCAL_IF;

fn bcrypt_hash(password: &str) -> String {
    bcrypt::hash(password, 10).expect("bcrypt")
}

const TLS_URL: &str = "https://127.0.0.1:9925";

#[test]
fn tls_and_basic_auth_with_curl() {
    require_root!();
    let pair = Pair::new();
    let pki = Pki::new();
    // Relative paths are relative to the web config file.
    let config = pki.dir.write(
        "web.yml",
        format!(
            "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n\
             basic_auth_users:\n  prometheus: '{}'\n  other: '{}'\n",
            bcrypt_hash("s3cret pass"),
            bcrypt_hash("other pass")
        ),
    );
    let ca = pki.file("ca.crt");
    let ns = &pair.local;
    let rsts = RstOracle::install(ns, SF0);
    let metrics = format!("{TLS_URL}/metrics");
    let mut inst = smtpflow::start(
        ns,
        &[
            "watch",
            "--iface",
            SF0,
            "--metrics-addr",
            METRICS_ADDR,
            "--interval",
            "100ms",
            "--web.config.file",
            &config,
        ],
        || curl(ns, &["--cacert", &ca, "-u", "prometheus:s3cret pass", &metrics]).1 == 200,
    );
    let _open = inbound(&pair, 2);
    let scrape = || {
        let (code, status, out, err) =
            curl(ns, &["--cacert", &ca, "-u", "prometheus:s3cret pass", &metrics]);
        assert_eq!((code, status), (Some(0), 200), "authorized scrape: {err}\n{out}");
        Metrics::parse(out.split_once("\r\n\r\n").map_or("", |(_, b)| b))
    };
    counters(scrape, || inbound_only(2, &rsts.read()), || inst.stderr());

    // The second user, and the same right password again (remembered): 200.
    for (user, what) in [("other:other pass", "second user"), ("prometheus:s3cret pass", "again")] {
        let (code, status, _, err) = curl(ns, &["--cacert", &ca, "-u", user, &metrics]);
        assert_eq!((code, status), (Some(0), 200), "{what}: {err}");
    }
    // Wrong password, unknown user, a user's password for another, no credentials: 401 with a
    // Basic challenge, for /healthz too, and no metrics in the body.
    for (creds, what) in [
        (Some("prometheus:wrong"), "wrong password"),
        (Some("prometheus:s3cret pas"), "a prefix of the password"),
        (Some("nobody:s3cret pass"), "unknown user"),
        (Some("other:s3cret pass"), "another user's password"),
        (Some("prometheus:"), "empty password"),
        (None, "no credentials"),
    ] {
        for path in ["/metrics", "/healthz", "/nope"] {
            let url = format!("{TLS_URL}{path}");
            let mut args = vec!["--cacert", ca.as_str()];
            if let Some(c) = creds {
                args.extend(["-u", c]);
            }
            args.push(&url);
            let (code, status, out, err) = curl(ns, &args);
            assert_eq!((code, status), (Some(0), 401), "{what} {path}: {err}\n{out}");
            assert!(
                out.to_ascii_lowercase().contains("www-authenticate: basic"),
                "{what} {path}: no Basic challenge:\n{out}"
            );
            assert!(!out.contains(PREFIX), "{what} {path}: metrics leaked:\n{out}");
        }
    }
    // Authorized but not an endpoint: 404; a POST: 405.
    let (_, status, _, _) =
        curl(ns, &["--cacert", &ca, "-u", "prometheus:s3cret pass", &format!("{TLS_URL}/nope")]);
    assert_eq!(status, 404);
    let (_, status, _, _) =
        curl(ns, &["--cacert", &ca, "-u", "prometheus:s3cret pass", "-X", "POST", &metrics]);
    assert_eq!(status, 405);

    // Plain HTTP on the TLS port: no HTTP answer at all.
    let (code, status, out, err) =
        curl(ns, &["-u", "prometheus:s3cret pass", &format!("http://{METRICS_ADDR}/metrics")]);
    assert!(code != Some(0) && status == 0, "plain HTTP was answered ({code:?}, {status}): {out}");
    eprintln!("plain HTTP on the TLS port: curl exit {code:?}: {}", err.trim());
    // TLS without trusting the CA: refused by curl (exit 60: the certificate is not trusted).
    let (code, status, _, err) = curl(ns, &["-u", "prometheus:s3cret pass", &metrics]);
    assert_eq!((code, status), (Some(60), 0), "an untrusted certificate was accepted: {err}");
    // The certificate is the one configured: it verifies for 127.0.0.1 with --cacert, and
    // naming another host fails (the SAN is IP:127.0.0.1 only).
    let (code, _, _, err) = curl(
        ns,
        &[
            "--cacert",
            &ca,
            "-u",
            "prometheus:s3cret pass",
            "--resolve",
            "other.test:9925:127.0.0.1",
            "https://other.test:9925/metrics",
        ],
    );
    assert_eq!(code, Some(60), "a certificate for another name was accepted: {err}");
    // Still serving after all that, and still the only thing it does.
    assert!(inst.try_wait().is_none(), "smtpflow exited:\n{}", inst.stderr());
    assert_eq!(inst.stop_with(libc::SIGTERM), Some(0), "{}", inst.stderr());
    assert_unhooked_within(ns, SF0, Duration::from_secs(10), "SIGTERM with TLS");
}

#[test]
fn tls_client_certificates_and_min_version() {
    require_root!();
    let pair = Pair::new();
    let pki = Pki::new();
    let config = pki.dir.write(
        "web.yml",
        "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n  \
         client_ca_file: ca.crt\n  client_auth_type: RequireAndVerifyClientCert\n  \
         min_version: TLS13\n",
    );
    let (ca, crt, key) = (pki.file("ca.crt"), pki.file("client.crt"), pki.file("client.key"));
    let ns = &pair.local;
    let metrics = format!("{TLS_URL}/metrics");
    let with_cert = ["--cacert", &ca, "--cert", &crt, "--key", &key];
    let mut inst = smtpflow::start(
        ns,
        &["watch", "--iface", SF0, "--metrics-addr", METRICS_ADDR, "--web.config.file", &config],
        || curl(ns, &[&with_cert[..], &[metrics.as_str()]].concat()).1 == 200,
    );
    let (code, status, out, err) = curl(ns, &[&with_cert[..], &[metrics.as_str()]].concat());
    assert_eq!((code, status), (Some(0), 200), "{err}");
    assert!(out.contains(BUILD_INFO));
    // No client certificate, or one from an untrusted CA: the handshake fails, nothing served.
    let (rcrt, rkey) = (pki.file("rogue-client.crt"), pki.file("rogue-client.key"));
    for (args, what) in [
        (vec!["--cacert", ca.as_str(), metrics.as_str()], "no client certificate"),
        (
            vec!["--cacert", &ca, "--cert", &rcrt, "--key", &rkey, metrics.as_str()],
            "a certificate from another CA",
        ),
    ] {
        let (code, status, out, err) = curl(ns, &args);
        assert!(code != Some(0) && status == 0, "{what}: served ({code:?} {status}): {out}");
        eprintln!("{what}: curl exit {code:?}: {}", err.trim());
    }
    // min_version TLS13: a TLS 1.2 client is refused.
    let (code, status, _, err) =
        curl(ns, &[&with_cert[..], &["--tls-max", "1.2", metrics.as_str()]].concat());
    assert!(code != Some(0) && status == 0, "TLS 1.2 accepted with min_version TLS13: {err}");
    assert_eq!(inst.stop_with(libc::SIGTERM), Some(0), "{}", inst.stderr());
}

#[test]
fn bad_web_config_refuses_to_start_before_attaching() {
    require_root!();
    let pair = Pair::new();
    let pki = Pki::new();
    let dir = &pki.dir;
    let hash = bcrypt_hash("x");
    let tls = |extra: &str| {
        format!("tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n{extra}")
    };
    let cases: Vec<(&str, String, Vec<&str>)> = vec![
        ("not YAML", "basic_auth_users: [unclosed\n".into(), vec!["YAML"]),
        ("unknown key", "tls_config:\n  cert_file: a\n".into(), vec!["unknown key", "tls_config"]),
        (
            "plain password",
            "basic_auth_users:\n  prometheus: secret\n".into(),
            vec!["prometheus", "not a bcrypt hash"],
        ),
        (
            "users not a mapping",
            "basic_auth_users: [a, b]\n".into(),
            vec!["basic_auth_users", "mapping"],
        ),
        ("no cert_file", "tls_server_config:\n  key_file: server.key\n".into(), vec!["cert_file"]),
        (
            "missing certificate",
            "tls_server_config:\n  cert_file: missing.crt\n  key_file: server.key\n".into(),
            vec!["missing.crt"],
        ),
        (
            "key of another certificate",
            "tls_server_config:\n  cert_file: server.crt\n  key_file: client.key\n".into(),
            vec!["do not match"],
        ),
        (
            "not a certificate",
            "tls_server_config:\n  cert_file: server.ext\n  key_file: server.key\n".into(),
            vec!["server.ext"],
        ),
        ("unknown TLS key", tls("  max_version: TLS13\n"), vec!["max_version"]),
        ("bad min_version", tls("  min_version: TLS11\n"), vec!["min_version", "TLS11"]),
        (
            "client auth without a CA",
            tls("  client_auth_type: RequireAndVerifyClientCert\n"),
            vec!["client_ca_file"],
        ),
        (
            "bad client_auth_type",
            tls("  client_ca_file: ca.crt\n  client_auth_type: Maybe\n"),
            vec!["Maybe"],
        ),
        (
            "good TLS, bad user",
            format!("{}basic_auth_users:\n  ok: '{hash}'\n  bad: plain\n", tls("")),
            vec!["bad", "not a bcrypt hash"],
        ),
    ];
    let mut all = Vec::new();
    for (i, (what, text, words)) in cases.iter().enumerate() {
        let path = dir.write(&format!("web{i}.yml"), text);
        all.push((what.to_string(), path, words.clone()));
    }
    all.push((
        "no such file".into(),
        dir.join("nonexistent.yml").display().to_string(),
        vec!["nonexistent.yml"],
    ));
    for (what, path, words) in all {
        assert_refused_web_config(&pair, &what, &path, &words);
    }
}

/// `watch --web.config.file <path>` exits non-zero quickly, naming the file and every one of
/// `words`, with nothing attached (netlink filters would survive a failed start: the strictest
/// check that nothing was attached before the file was read).
fn assert_refused_web_config(pair: &Pair, what: &str, path: &str, words: &[&str]) {
    let r = run_watch(
        &pair.local,
        &[],
        &[
            "--iface",
            SF0,
            "--metrics-addr",
            METRICS_ADDR,
            "--tc-link",
            "netlink",
            "--web.config.file",
            path,
        ],
    );
    let err = r.assert_failed(what, words);
    assert!(r.elapsed < Duration::from_secs(5), "{what}: took {:?} to refuse", r.elapsed);
    eprintln!("{what}: {}", err.trim());
    assert!(
        err.contains("web config file") && err.contains(path),
        "{what}: the message does not name the file:\n{err}"
    );
    assert!(!err.contains("attached"), "{what}: attached before refusing:\n{err}");
    assert_unhooked(&pair.local, SF0, what);
}

/// Keys of the exporter-toolkit format whose values are lists or booleans, which smtpflow does
/// not support, and an unknown top-level key: the refusal must name the key, plainly.
#[test]
fn bad_web_config_names_the_key_plainly() {
    require_root!();
    let pair = Pair::new();
    let pki = Pki::new();
    let tls = "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n";
    for (i, (key, text)) in [
        ("cipher_suites", format!("{tls}  cipher_suites: [TLS_AES_128_GCM_SHA256]\n")),
        ("curve_preferences", format!("{tls}  curve_preferences: [X25519]\n")),
        ("prefer_server_cipher_suites", format!("{tls}  prefer_server_cipher_suites: true\n")),
        ("tls_config", "tls_config:\n  cert_file: a\n".to_owned()),
    ]
    .into_iter()
    .enumerate()
    {
        // The file name must not contain the key, or the check would pass on the path alone.
        let path = pki.dir.write(&format!("web-{i}.yml"), text);
        assert_refused_web_config(&pair, key, &path, &[key]);
        let r = run_watch(&pair.local, &[], &["--iface", SF0, "--web.config.file", &path]);
        assert!(!r.stderr.contains("Some("), "{key}: Rust debug output in:\n{}", r.stderr);
    }
}
