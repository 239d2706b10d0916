//! Plain TCP traffic between namespaces: a server that accepts and closes, clients that connect
//! and close, clients that are refused.
use std::{
    net::{SocketAddr, TcpListener, TcpStream},
    thread,
    time::Duration,
};

use crate::{Netns, in_netns};

/// Listens on `addr` inside `ns` and accepts (then closes) `n` connections on a thread.
pub fn serve(ns: &Netns, addr: &str, n: usize) -> thread::JoinHandle<()> {
    let addr: SocketAddr = addr.parse().expect("a socket address");
    let listener = in_netns(ns, move || TcpListener::bind(addr).expect("bind test server"));
    thread::spawn(move || {
        for _ in 0..n {
            let (s, _) = listener.accept().expect("accept");
            drop(s);
        }
    })
}

/// Connects `n` times from `ns`; each connection is closed once the server has closed it (the
/// server's FIN read first, so neither side ever has to answer with a RST: exact counts).
pub fn connect_n(ns: &Netns, addr: &str, n: usize) {
    let addr: SocketAddr = addr.parse().expect("a socket address");
    in_netns(ns, move || {
        for _ in 0..n {
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
            s.set_read_timeout(Some(Duration::from_secs(5))).expect("read timeout");
            let _ = std::io::Read::read(&mut s, &mut [0u8; 1]);
            drop(s);
        }
    });
}

/// `n` connection attempts from `ns` to a closed port; each must be refused.
pub fn connect_refused(ns: &Netns, addr: &str, n: usize) {
    let addr: SocketAddr = addr.parse().expect("a socket address");
    in_netns(ns, move || {
        for _ in 0..n {
            let e = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
                .expect_err("the port must be closed");
            assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}");
        }
    });
}
