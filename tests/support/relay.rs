//! A TCP relay in front of a test server that counts the connections made through it —
//! every one, those open now, and the most open at once — and can hold new ones until
//! [`open`](Relay::open)ed. What a client's connection pool does is then seen where it
//! matters, at the server, without teaching each test server to count.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::serve::{self, ServerTask};
use super::token::WAIT;

pub struct Relay {
    addr: SocketAddr,
    counts: Arc<Counts>,
    _task: ServerTask,
}

struct Counts {
    /// Connections accepted so far.
    accepted: watch::Sender<u64>,
    /// Connections open now, and the most open at once.
    open: watch::Sender<(u64, u64)>,
    /// New connections are relayed once this is true.
    gate: watch::Sender<bool>,
}

impl Relay {
    /// Relays every connection to `target` at once.
    pub async fn start(target: SocketAddr) -> Self {
        Self::spawn(target, true).await
    }

    /// Accepts connections but relays none (their bytes wait in the kernel) until
    /// [`open`](Self::open).
    pub async fn gated(target: SocketAddr) -> Self {
        Self::spawn(target, false).await
    }

    async fn spawn(target: SocketAddr, open: bool) -> Self {
        let listener = serve::bind("relay").await;
        let addr = listener
            .local_addr()
            .expect("a bound listener has an address");
        let counts = Arc::new(Counts {
            accepted: watch::Sender::new(0),
            open: watch::Sender::new((0, 0)),
            gate: watch::Sender::new(open),
        });
        let task = ServerTask::new(tokio::spawn(accept_loop(listener, target, counts.clone())));
        Self {
            addr,
            counts,
            _task: task,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Relays the connections held so far, and every later one.
    pub fn open(&self) {
        self.counts.gate.send_replace(true);
    }

    pub fn accepted(&self) -> u64 {
        *self.counts.accepted.borrow()
    }

    pub fn open_now(&self) -> u64 {
        self.counts.open.borrow().0
    }

    /// The most connections that were open at once.
    pub fn peak(&self) -> u64 {
        self.counts.open.borrow().1
    }

    /// Waits until `n` connections have been accepted; panics after [`WAIT`].
    pub async fn wait_for_accepted(&self, n: u64) {
        let mut accepted = self.counts.accepted.subscribe();
        let reached = tokio::time::timeout(WAIT, accepted.wait_for(|a| *a >= n)).await;
        assert!(
            matches!(reached, Ok(Ok(_))),
            "timed out after {WAIT:?} waiting for {n} connections; {} came",
            self.accepted()
        );
    }

    /// Waits until no connection is open; panics after [`WAIT`].
    pub async fn wait_for_all_closed(&self) {
        let mut open = self.counts.open.subscribe();
        let closed = tokio::time::timeout(WAIT, open.wait_for(|(now, _)| *now == 0)).await;
        assert!(
            matches!(closed, Ok(Ok(_))),
            "timed out after {WAIT:?} waiting for every connection to close; {} are open",
            self.open_now()
        );
    }
}

async fn accept_loop(listener: TcpListener, target: SocketAddr, counts: Arc<Counts>) {
    let mut connections = JoinSet::new();
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        counts.accepted.send_modify(|n| *n += 1);
        counts.open.send_modify(|(now, peak)| {
            *now += 1;
            *peak = (*peak).max(*now);
        });
        connections.spawn(relay(client, target, counts.clone()));
        while connections.try_join_next().is_some() {}
    }
}

async fn relay(mut client: TcpStream, target: SocketAddr, counts: Arc<Counts>) {
    let mut gate = counts.gate.subscribe();
    if gate.wait_for(|open| *open).await.is_ok()
        && let Ok(mut server) = TcpStream::connect(target).await
    {
        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
    }
    counts.open.send_modify(|(now, _)| *now -= 1);
}
