//! A blind TCP relay for CONNECT to an unrouted host: bytes copied both ways,
//! nothing inspected, no credentials anywhere near it.

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::server;

/// Copies until either side closes, or shutdown: a tunnel has no request
/// boundary to wait for, so it is closed at once.
pub async fn relay<C>(mut client: C, mut upstream: TcpStream, mut shutdown: watch::Receiver<bool>)
where
    C: AsyncRead + AsyncWrite + Unpin,
{
    tokio::select! {
        result = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {
            if let Err(error) = result {
                tracing::debug!(%error, "tunnel closed with an error");
            }
        }
        () = server::stopped(&mut shutdown) => {}
    }
}
