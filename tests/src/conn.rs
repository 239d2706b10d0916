//! Plain TCP traffic between namespaces: a server that accepts and closes, clients that connect
//! and read to the end, clients that are refused.
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

/// Connects `n` times from `ns`, one after the other, and reads each connection to its end (the
/// server's FIN). The connections are returned still open: keep them until the counters have
/// been read. The client closes last, so its socket would be freed as soon as the server
/// acknowledges its FIN (no TIME-WAIT on that side). A server segment still on its way then (a
/// FIN retransmitted after a stall, a TIME-WAIT's re-ACK) finds no socket, and the client's
/// kernel answers it with a RST the client never meant to send. On an emulated VM such late
/// segments happen: veth queues packets on the sending CPU, and a stalled vCPU holds its queue
/// while the other one goes on. An open socket answers them with an ACK, which is no event.
#[must_use = "closing the connections before the counters are read may add a RST"]
pub fn connect_n(ns: &Netns, addr: &str, n: usize) -> Vec<TcpStream> {
    let addr: SocketAddr = addr.parse().expect("a socket address");
    in_netns(ns, move || {
        (0..n)
            .map(|_| {
                let mut s =
                    TcpStream::connect_timeout(&addr, Duration::from_secs(30)).expect("connect");
                s.set_read_timeout(Some(Duration::from_secs(30))).expect("read timeout");
                let end = std::io::Read::read(&mut s, &mut [0u8; 1]);
                assert!(matches!(end, Ok(0)), "{addr}: the server did not close: {end:?}");
                s
            })
            .collect()
    })
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
