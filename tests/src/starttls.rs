//! TLS in SMTP sessions: a server that offers STARTTLS (or speaks implicit TLS, as on 465),
//! built on rustls with the test PKI's server certificate and one chosen TLS version, and the
//! clients that drive it: `openssl s_client` (a real client, through the whole handshake) and a
//! client that sends its ClientHello, reads the server's answer and resets. Every wait is
//! bounded; a session's failure is returned, never a panic on the server's thread.
use std::{
    io::{self, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::Arc,
    thread::{self, JoinHandle},
    time::Duration,
};

use rustls::{
    ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection, StreamOwned,
    SupportedProtocolVersion,
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject as _},
};

use crate::{
    Netns, in_netns,
    pki::Pki,
    process::{Finished, run_in},
    smtp::{accept_within, linger_zero},
};

/// The server's reply to EHLO, written in one segment: the name, then its extensions.
pub const EHLO_REPLY: &[u8] =
    b"250-mx.tls.test\r\n250-PIPELINING\r\n250-STARTTLS\r\n250 8BITMIME\r\n";
/// The server's `220` answering STARTTLS.
pub const GO_AHEAD: &[u8] = b"220 2.0.0 Ready to start TLS\r\n";

/// How a session starts TLS.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// A clear-text greeting and EHLO, then STARTTLS (ports 25 and 587).
    Starttls,
    /// TLS from the first byte (port 465).
    Implicit,
}

/// A rustls server configuration with the PKI's server certificate, speaking only `version`
/// (`&rustls::version::TLS13` or `TLS12`).
pub fn server_config(pki: &Pki, version: &'static SupportedProtocolVersion) -> Arc<ServerConfig> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(pki.file("server.crt"))
        .expect("server certificate")
        .collect::<Result<_, _>>()
        .expect("server certificate");
    let key = PrivateKeyDer::from_pem_file(pki.file("server.key")).expect("server key");
    let config =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(&[version])
            .expect("protocol version")
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .expect("server certificate and key");
    Arc::new(config)
}

/// Serves `n` connections on `l` one after the other, on a thread; returns each session's
/// outcome once all were served (or one could not be accepted within 20 s).
pub fn serve(
    l: TcpListener,
    n: usize,
    config: Arc<ServerConfig>,
    mode: Mode,
) -> JoinHandle<Vec<Result<(), String>>> {
    thread::spawn(move || {
        (0..n)
            .map(|_| {
                let s = accept_within(&l, Duration::from_secs(20));
                s.set_read_timeout(Some(Duration::from_secs(10))).map_err(|e| e.to_string())?;
                session(s, config.clone(), mode).map_err(|e| e.to_string())
            })
            .collect()
    })
}

/// One line, read a byte at a time so that nothing after it (the client's TLS) is consumed.
fn read_line(s: &mut impl Read) -> io::Result<Vec<u8>> {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while !line.ends_with(b"\n") {
        if line.len() > 1000 {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "line too long"));
        }
        if s.read(&mut b)? == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "end of stream"));
        }
        line.push(b[0]);
    }
    Ok(line)
}

/// Answers commands until QUIT (or the end): EHLO/HELO with 250, QUIT with 221, others 250.
fn answer(s: &mut (impl Read + Write), ehlo: &[u8]) -> io::Result<()> {
    loop {
        let line = match read_line(s) {
            Ok(l) => l,
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        };
        let upper = line.to_ascii_uppercase();
        if upper.starts_with(b"EHLO") || upper.starts_with(b"HELO") {
            s.write_all(ehlo)?;
        } else if upper.starts_with(b"QUIT") {
            s.write_all(b"221 2.0.0 Bye\r\n")?;
            return s.flush();
        } else if upper.starts_with(b"STARTTLS") {
            return Ok(());
        } else {
            s.write_all(b"250 2.0.0 OK\r\n")?;
        }
        s.flush()?;
    }
}

fn session(mut tcp: TcpStream, config: Arc<ServerConfig>, mode: Mode) -> io::Result<()> {
    if mode == Mode::Starttls {
        tcp.write_all(b"220 mx.tls.test ESMTP\r\n")?;
        // Until STARTTLS (answer returns on it, or on QUIT or the end).
        answer(&mut tcp, EHLO_REPLY)?;
        tcp.write_all(GO_AHEAD)?;
    }
    let conn = ServerConnection::new(config).map_err(io::Error::other)?;
    let mut tls = StreamOwned::new(conn, tcp);
    while tls.conn.is_handshaking() {
        tls.conn.complete_io(&mut tls.sock)?;
    }
    if mode == Mode::Implicit {
        tls.write_all(b"220 mx.tls.test ESMTP\r\n")?;
    }
    answer(&mut tls, b"250-mx.tls.test\r\n250 8BITMIME\r\n")?;
    tls.conn.send_close_notify();
    tls.conn.complete_io(&mut tls.sock)?;
    Ok(())
}

/// `openssl s_client` from `ns` to `addr`: with `starttls`, `-starttls smtp` (it reads the
/// greeting, sends EHLO, checks STARTTLS is offered, sends it and reads the 220); then the TLS
/// handshake (`version_flag`: `-tls1_3` or `-tls1_2`), and in TLS `EHLO` and `QUIT`. The server
/// closes after its 221.
pub fn s_client(ns: &Netns, addr: &str, starttls: bool, version_flag: &str) -> Finished {
    let starttls = if starttls { "-starttls smtp" } else { "" };
    let script = format!(
        "printf 'EHLO client.tls.test\\r\\nQUIT\\r\\n' | \
         openssl s_client -connect {addr} {starttls} {version_flag} -quiet"
    );
    run_in(ns, "sh", &["-c", &script], Duration::from_secs(30))
}

/// From `ns`: reads the greeting, sends EHLO and STARTTLS, reads the 220, sends a real
/// ClientHello (rustls, `version`), waits for the server's first TLS bytes (its ServerHello),
/// then resets the connection (SO_LINGER 0) before the handshake can complete. Returns how many
/// bytes of the server's TLS answer it read.
pub fn reset_mid_handshake(
    ns: &Netns,
    addr: &str,
    version: &'static SupportedProtocolVersion,
) -> usize {
    let addr: SocketAddr = addr.parse().expect("socket address");
    in_netns(ns, move || {
        let mut tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
        tcp.set_read_timeout(Some(Duration::from_secs(10))).expect("read timeout");
        let expect_reply = |tcp: &mut TcpStream, code: &[u8]| loop {
            let line = read_line(tcp).expect("a reply line");
            assert!(line.starts_with(code), "want {code:?}: {:?}", String::from_utf8_lossy(&line));
            if line.get(3) == Some(&b' ') {
                break;
            }
        };
        expect_reply(&mut tcp, b"220");
        tcp.write_all(b"EHLO client.tls.test\r\n").expect("EHLO");
        expect_reply(&mut tcp, b"250");
        tcp.write_all(b"STARTTLS\r\n").expect("STARTTLS");
        expect_reply(&mut tcp, b"220");
        let config =
            ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_protocol_versions(&[version])
                .expect("protocol version")
                .with_root_certificates(RootCertStore::empty())
                .with_no_client_auth();
        let name = ServerName::try_from("mx.tls.test").expect("server name");
        let mut conn = ClientConnection::new(Arc::new(config), name).expect("client");
        while conn.wants_write() {
            conn.write_tls(&mut tcp).expect("ClientHello");
        }
        let mut answer = [0u8; 4096];
        let n = tcp.read(&mut answer).expect("the server's hello");
        assert!(n > 0 && answer[0] == 0x16, "a TLS handshake record: {:?}", &answer[..n.min(8)]);
        linger_zero(&tcp);
        drop(tcp);
        n
    })
}
