//! A blind TCP relay for CONNECT to an unrouted host: bytes copied both ways,
//! nothing inspected, no credentials anywhere near it.

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

pub async fn relay<C>(mut client: C, mut upstream: TcpStream)
where
    C: AsyncRead + AsyncWrite + Unpin,
{
    if let Err(error) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
        tracing::debug!(%error, "tunnel closed with an error");
    }
}
