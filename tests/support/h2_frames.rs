//! Raw h2 frames (RFC 9113 §4, §6) for hand-written upstreams that do what no h2
//! server library does on demand: a GOAWAY naming any last stream id, a RST_STREAM on
//! the spot. The unit tests of `src/proxy/upstream/failure.rs` include this file by
//! path, as unit tests cannot reach `tests/support`.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

pub const DATA: u8 = 0x0;
pub const HEADERS: u8 = 0x1;
pub const RST_STREAM: u8 = 0x3;
pub const SETTINGS: u8 = 0x4;
pub const PING: u8 = 0x6;
pub const GOAWAY: u8 = 0x7;

/// Error codes (RFC 9113 §7).
pub const NO_ERROR: u32 = 0x0;
pub const INTERNAL_ERROR: u32 = 0x2;
pub const REFUSED_STREAM: u32 = 0x7;

const ACK: u8 = 0x1;
pub const END_STREAM: u8 = 0x1;
pub const END_HEADERS: u8 = 0x4;

pub struct Frame {
    pub kind: u8,
    pub flags: u8,
    pub stream: u32,
    pub payload: Vec<u8>,
}

pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let length = u32::try_from(payload.len())
        .expect("a frame under 16 MiB")
        .to_be_bytes();
    let mut frame = vec![length[1], length[2], length[3], kind, flags];
    frame.extend(stream.to_be_bytes());
    frame.extend(payload);
    frame
}

/// GOAWAY with NO_ERROR naming `last_stream_id`.
pub fn goaway(last_stream_id: u32) -> Vec<u8> {
    let payload = [last_stream_id.to_be_bytes(), NO_ERROR.to_be_bytes()].concat();
    frame(GOAWAY, 0, 0, &payload)
}

pub fn reset(stream: u32, code: u32) -> Vec<u8> {
    frame(RST_STREAM, 0, stream, &code.to_be_bytes())
}

/// A 200 (`:status` is the static table's entry 8) with `body`.
pub fn ok(stream: u32, body: &[u8]) -> Vec<u8> {
    [
        frame(HEADERS, END_HEADERS, stream, &[0x88]),
        frame(DATA, END_STREAM, stream, body),
    ]
    .concat()
}

/// Reads the client's connection preface and sends the server's (empty SETTINGS);
/// false when the client went away first.
pub async fn accept(io: &mut (impl AsyncRead + AsyncWrite + Unpin)) -> bool {
    let mut preface = [0; 24];
    io.read_exact(&mut preface).await.is_ok()
        && io.write_all(&frame(SETTINGS, 0, 0, &[])).await.is_ok()
}

/// The next frame; None once the connection ends.
pub async fn read(io: &mut (impl AsyncRead + Unpin)) -> Option<Frame> {
    let mut head = [0; 9];
    io.read_exact(&mut head).await.ok()?;
    let length = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
    let mut payload = vec![0; length];
    io.read_exact(&mut payload).await.ok()?;
    Some(Frame {
        kind: head[3],
        flags: head[4],
        stream: u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff,
        payload,
    })
}

impl Frame {
    /// The acknowledgement a SETTINGS or PING frame asks for, if any.
    pub fn ack(&self) -> Option<Vec<u8>> {
        match self.kind {
            SETTINGS if self.flags & ACK == 0 => Some(frame(SETTINGS, ACK, 0, &[])),
            PING if self.flags & ACK == 0 => Some(frame(PING, ACK, 0, &self.payload)),
            _ => None,
        }
    }
}
