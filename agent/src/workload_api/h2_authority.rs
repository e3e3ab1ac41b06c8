//! Accepting gRPC clients that send their socket path as the HTTP/2 `:authority`.
//!
//! gRPC C-core (grpcio ≥ 1.57, so py-spiffe; also grpc-java) connects to `unix:/path`
//! with `:authority` set to the percent-encoded path (`tmp%2Fagent%2Fapi.sock`). That is
//! not a valid URI authority, and the HTTP/2 server under tonic (h2, through the `http`
//! crate) resets every such stream with PROTOCOL_ERROR (hyperium/h2#487, open). The
//! Workload API must work with every SPIFFE client, so this layer sits between the
//! socket and h2 on the inbound side only:
//!
//! - the connection preface and every frame other than HEADERS/CONTINUATION pass through
//!   byte for byte;
//! - the connection's first header block is decoded; if its `:authority` is a plain host
//!   name (tonic, grpc-go, Envoy), the original bytes go through and the connection
//!   becomes a plain pass-through, at no further cost;
//! - otherwise every header block (HEADERS plus its CONTINUATIONs) is decoded with the
//!   client's HPACK state, an `:authority` that is not a plain host name is replaced by
//!   `localhost` (the authority grpc-go and tonic use for Unix sockets), and the block is
//!   re-encoded as literals without indexing, so h2's HPACK table never depends on ours.
//!
//! Nothing here identifies the caller; the authority is not used for anything. Outbound
//! bytes are untouched.
//!
//! HPACK decoding is not cheap (the decoder builds its Huffman table for every string:
//! about a quarter of the agent's CPU per connection in BENCHMARKS.md B15's profile), and
//! a client library opens every connection with the same first header block. The first
//! header block of a connection is decoded with an empty dynamic table, so what it
//! decodes to depends on its bytes alone: the last [`KNOWN_PLAIN`] first blocks found
//! to carry a plain authority are remembered (byte for byte, each at most
//! [`KNOWN_PLAIN_BYTES`]), and a connection opening with one of them goes straight to
//! pass-through without decoding.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

const PREFACE_LEN: usize = 24;
const FRAME_HEADER_LEN: usize = 9;
const TYPE_HEADERS: u8 = 0x1;
const TYPE_CONTINUATION: u8 = 0x9;
const FLAG_END_STREAM: u8 = 0x1;
const FLAG_END_HEADERS: u8 = 0x4;
const FLAG_PADDED: u8 = 0x8;
const FLAG_PRIORITY: u8 = 0x20;
/// Frames emitted are at most the HTTP/2 default SETTINGS_MAX_FRAME_SIZE, which is what
/// the server advertises.
const MAX_EMIT_FRAME: usize = 16_384;
/// Largest frame accepted from a client (the protocol maximum is 2^24 - 1; h2 enforces
/// its own smaller limit on what passes through).
const MAX_FRAME: usize = 1 << 20;
/// Largest header block (all CONTINUATIONs together) accepted from a client.
const MAX_HEADER_BLOCK: usize = 64 * 1024;
/// Largest decoded header list accepted from a client, counted as RFC 7541 §4.1 counts
/// (name + value + 32 per field). HPACK's indexed fields let one byte stand for a
/// header of up to the table size, so the encoded limit alone does not bound what
/// decoding allocates (64 KiB of references to a 4 KiB header would be 256 MiB).
const MAX_HEADER_LIST: usize = 64 * 1024;
/// The largest dynamic table size a client may announce: HTTP/2's default
/// SETTINGS_HEADER_TABLE_SIZE, which the server (h2) does not change. Without it a
/// client could grow the decoder's table without bound.
const MAX_TABLE_SIZE: usize = 4096;

/// How many first header blocks with a plain authority are remembered.
const KNOWN_PLAIN: usize = 16;
/// The largest first header block remembered.
const KNOWN_PLAIN_BYTES: usize = 1024;

/// First header blocks (each a connection's first, so decoded from an empty dynamic
/// table) known to carry a plain authority, oldest first.
static PLAIN_FIRST_BLOCKS: std::sync::Mutex<std::collections::VecDeque<Box<[u8]>>> =
    std::sync::Mutex::new(std::collections::VecDeque::new());

fn known_plain(block: &[u8]) -> bool {
    PLAIN_FIRST_BLOCKS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .iter()
        .any(|b| **b == *block)
}

fn remember_plain(block: &[u8]) {
    if block.len() > KNOWN_PLAIN_BYTES {
        return;
    }
    let mut known = PLAIN_FIRST_BLOCKS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if known.iter().any(|b| **b == *block) {
        return;
    }
    if known.len() >= KNOWN_PLAIN {
        known.pop_front();
    }
    known.push_back(block.into());
}

/// What the layer does with the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Looking at the first header block.
    Inspect,
    /// The client sends invalid authorities: re-encode every header block.
    Rewrite,
    /// The client's authority is fine: forward bytes untouched.
    Passthrough,
}

struct Pending {
    /// The original frames, forwarded as they are if no rewrite is needed.
    raw: Vec<u8>,
    stream_id: [u8; 4],
    flags: u8,
    priority: Option<[u8; 5]>,
    block: Vec<u8>,
}

/// Wraps a server-side HTTP/2 byte stream; see the module docs.
pub struct AuthorityFix<S> {
    inner: S,
    input: Vec<u8>,
    output: Vec<u8>,
    out_pos: usize,
    preface_left: usize,
    decoder: loona_hpack::Decoder<'static>,
    pending: Option<Pending>,
    mode: Mode,
    eof: bool,
}

impl<S> std::fmt::Debug for AuthorityFix<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthorityFix").finish_non_exhaustive()
    }
}

fn protocol(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("HTTP/2: {msg}"))
}

/// Whether `v` can stand as a URI authority as the `http` crate parses it: a host name,
/// IPv4 or bracketed IPv6 address, optionally with a port.
fn plain_authority(v: &[u8]) -> bool {
    !v.is_empty()
        && v.iter().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b':' | b'[' | b']')
        })
}

fn encode_int(out: &mut Vec<u8>, first: u8, prefix_bits: u8, mut value: usize) {
    let max = (1usize << prefix_bits) - 1;
    if value < max {
        out.push(first | value as u8);
        return;
    }
    out.push(first | max as u8);
    value -= max;
    while value >= 128 {
        out.push((value % 128) as u8 | 0x80);
        value /= 128;
    }
    out.push(value as u8);
}

/// A header block of literals without indexing (no Huffman), which needs no decoder state.
fn encode_literal_block(headers: &[(Vec<u8>, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in headers {
        out.push(0x00);
        encode_int(&mut out, 0, 7, name.len());
        out.extend_from_slice(name);
        encode_int(&mut out, 0, 7, value.len());
        out.extend_from_slice(value);
    }
    out
}

impl<S> AuthorityFix<S> {
    /// Wraps the server side of a connection.
    pub fn new(inner: S) -> Self {
        let mut decoder = loona_hpack::Decoder::new();
        decoder.set_max_allowed_table_size(MAX_TABLE_SIZE);
        AuthorityFix {
            inner,
            input: Vec::new(),
            output: Vec::new(),
            out_pos: 0,
            preface_left: PREFACE_LEN,
            decoder,
            pending: None,
            mode: Mode::Inspect,
            eof: false,
        }
    }

    /// The wrapped stream.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Moves every complete frame from `input` to `output`, rewriting header blocks.
    fn process(&mut self) -> io::Result<()> {
        if self.preface_left > 0 {
            let n = self.preface_left.min(self.input.len());
            self.output.extend(self.input.drain(..n));
            self.preface_left -= n;
            if self.preface_left > 0 {
                return Ok(());
            }
        }
        let mut pos = 0;
        while self.mode != Mode::Passthrough && self.input.len() - pos >= FRAME_HEADER_LEN {
            let h = &self.input[pos..pos + FRAME_HEADER_LEN];
            let len = usize::from(h[0]) << 16 | usize::from(h[1]) << 8 | usize::from(h[2]);
            if len > MAX_FRAME {
                return Err(protocol("frame too large"));
            }
            if self.input.len() - pos < FRAME_HEADER_LEN + len {
                break;
            }
            let (kind, flags) = (h[3], h[4]);
            let stream_id = [h[5], h[6], h[7], h[8]];
            let frame = pos..pos + FRAME_HEADER_LEN + len;
            let payload = pos + FRAME_HEADER_LEN..pos + FRAME_HEADER_LEN + len;
            pos += FRAME_HEADER_LEN + len;
            match kind {
                TYPE_HEADERS => {
                    if self.pending.is_some() {
                        return Err(protocol("HEADERS while a header block is open"));
                    }
                    let mut p = &self.input[payload];
                    let mut pad = 0;
                    if flags & FLAG_PADDED != 0 {
                        let (&n, rest) = p.split_first().ok_or_else(|| protocol("bad padding"))?;
                        pad = usize::from(n);
                        p = rest;
                    }
                    let mut priority = None;
                    if flags & FLAG_PRIORITY != 0 {
                        if p.len() < 5 {
                            return Err(protocol("bad priority"));
                        }
                        let mut pr = [0u8; 5];
                        pr.copy_from_slice(&p[..5]);
                        priority = Some(pr);
                        p = &p[5..];
                    }
                    if pad > p.len() {
                        return Err(protocol("padding longer than the frame"));
                    }
                    let block = p[..p.len() - pad].to_vec();
                    let raw = if self.mode == Mode::Inspect {
                        self.input[frame].to_vec()
                    } else {
                        Vec::new()
                    };
                    self.pending = Some(Pending {
                        raw,
                        stream_id,
                        flags,
                        priority,
                        block,
                    });
                    if flags & FLAG_END_HEADERS != 0 {
                        self.finish_block()?;
                    }
                }
                TYPE_CONTINUATION => {
                    let Some(pending) = self.pending.as_mut() else {
                        return Err(protocol("CONTINUATION without HEADERS"));
                    };
                    if pending.stream_id != stream_id {
                        return Err(protocol("CONTINUATION on another stream"));
                    }
                    pending.block.extend_from_slice(&self.input[payload]);
                    if self.mode == Mode::Inspect {
                        pending.raw.extend_from_slice(&self.input[frame]);
                    }
                    if pending.block.len() > MAX_HEADER_BLOCK {
                        return Err(protocol("header block too large"));
                    }
                    if flags & FLAG_END_HEADERS != 0 {
                        self.finish_block()?;
                    }
                }
                _ => {
                    if self.pending.is_some() {
                        return Err(protocol("frame inside a header block"));
                    }
                    self.output.extend_from_slice(&self.input[frame]);
                }
            }
        }
        self.input.drain(..pos);
        if self.mode == Mode::Passthrough {
            self.output.append(&mut self.input);
        }
        Ok(())
    }

    fn finish_block(&mut self) -> io::Result<()> {
        let Some(p) = self.pending.take() else {
            return Ok(());
        };
        if self.mode == Mode::Inspect && known_plain(&p.block) {
            self.output.extend_from_slice(&p.raw);
            self.mode = Mode::Passthrough;
            return Ok(());
        }
        let mut headers = Vec::new();
        let mut list_size = 0usize;
        self.decoder
            .decode_with_cb(&p.block, |name, value| {
                list_size = list_size.saturating_add(name.len() + value.len() + 32);
                if list_size <= MAX_HEADER_LIST {
                    headers.push((name.into_owned(), value.into_owned()));
                }
            })
            .map_err(|e| protocol(&format!("bad header block: {e}")))?;
        if list_size > MAX_HEADER_LIST {
            return Err(protocol("header list too large"));
        }
        let mut rewritten = false;
        for (name, value) in headers.iter_mut() {
            if name.as_slice() == b":authority" && !plain_authority(value) {
                *value = b"localhost".to_vec();
                rewritten = true;
            }
        }
        if self.mode == Mode::Inspect {
            if !rewritten {
                remember_plain(&p.block);
                self.output.extend_from_slice(&p.raw);
                self.mode = Mode::Passthrough;
                return Ok(());
            }
            tracing::debug!("client sends a non-host :authority; re-encoding its header blocks");
            self.mode = Mode::Rewrite;
        }
        let block = encode_literal_block(&headers);
        let mut chunks = block.chunks(MAX_EMIT_FRAME - 5).peekable();
        let mut first = true;
        loop {
            let chunk = chunks.next().unwrap_or(&[]);
            let last = chunks.peek().is_none();
            let (kind, mut flags, prio) = if first {
                (TYPE_HEADERS, p.flags & FLAG_END_STREAM, p.priority)
            } else {
                (TYPE_CONTINUATION, 0, None)
            };
            if prio.is_some() {
                flags |= FLAG_PRIORITY;
            }
            if last {
                flags |= FLAG_END_HEADERS;
            }
            let len = chunk.len() + prio.map_or(0, |_| 5);
            self.output.extend_from_slice(&[
                (len >> 16) as u8,
                (len >> 8) as u8,
                len as u8,
                kind,
                flags,
            ]);
            self.output.extend_from_slice(&p.stream_id);
            if let Some(pr) = prio {
                self.output.extend_from_slice(&pr);
            }
            self.output.extend_from_slice(chunk);
            first = false;
            if last {
                return Ok(());
            }
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for AuthorityFix<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if this.out_pos < this.output.len() {
                let n = buf.remaining().min(this.output.len() - this.out_pos);
                buf.put_slice(&this.output[this.out_pos..this.out_pos + n]);
                this.out_pos += n;
                if this.out_pos == this.output.len() {
                    this.output.clear();
                    this.out_pos = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            let mut tmp = [0u8; 8192];
            let mut rb = ReadBuf::new(&mut tmp);
            match Pin::new(&mut this.inner).poll_read(cx, &mut rb) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => {
                    if rb.filled().is_empty() {
                        this.eof = true;
                        // Hand h2 whatever is left, so it sees the truncation itself.
                        this.output.append(&mut this.input);
                        continue;
                    }
                    this.input.extend_from_slice(rb.filled());
                    this.process()?;
                }
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for AuthorityFix<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len();
        let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    fn request_headers(authority: &str) -> Vec<(Vec<u8>, Vec<u8>)> {
        [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", "/SpiffeWorkloadAPI/FetchX509SVID"),
            (":authority", authority),
            ("content-type", "application/grpc"),
            ("workload.spiffe.io", "true"),
        ]
        .iter()
        .map(|(n, v)| (n.as_bytes().to_vec(), v.as_bytes().to_vec()))
        .collect()
    }

    /// Feeds `input` through the layer (in small pieces) and returns what h2 would read.
    async fn run(input: Vec<u8>) -> io::Result<Vec<u8>> {
        let (mut client, server) = tokio::io::duplex(64);
        let writer = tokio::spawn(async move {
            for chunk in input.chunks(7) {
                client.write_all(chunk).await?;
            }
            client.shutdown().await
        });
        let mut fix = AuthorityFix::new(server);
        let mut out = Vec::new();
        let r = fix.read_to_end(&mut out).await;
        let _ = writer.await;
        r.map(|_| out)
    }

    /// Splits HTTP/2 bytes (after the preface) into (type, flags, stream, payload).
    fn frames(mut b: &[u8]) -> Vec<(u8, u8, u32, Vec<u8>)> {
        let mut v = Vec::new();
        while b.len() >= 9 {
            let len = usize::from(b[0]) << 16 | usize::from(b[1]) << 8 | usize::from(b[2]);
            let stream = u32::from_be_bytes([b[5], b[6], b[7], b[8]]);
            v.push((b[3], b[4], stream, b[9..9 + len].to_vec()));
            b = &b[9 + len..];
        }
        assert!(b.is_empty());
        v
    }

    #[tokio::test]
    async fn a_percent_encoded_authority_becomes_localhost_and_the_rest_passes_through() {
        let mut enc = loona_hpack::Encoder::new();
        let headers = request_headers("tmp%2Fagent%2Fapi.sock");
        let block = enc.encode(headers.iter().map(|(n, v)| (n.as_slice(), v.as_slice())));
        let settings = frame(0x4, 0, 0, &[0, 3, 0, 0, 0, 100]);
        let mut input = PREFACE.to_vec();
        input.extend(&settings);
        input.extend(frame(TYPE_HEADERS, FLAG_END_HEADERS, 1, &block));
        input.extend(frame(0x0, FLAG_END_STREAM, 1, &[0, 0, 0, 0, 0]));
        // A second request on the same connection exercises the HPACK dynamic table.
        let block2 = enc.encode(headers.iter().map(|(n, v)| (n.as_slice(), v.as_slice())));
        input.extend(frame(
            TYPE_HEADERS,
            FLAG_END_HEADERS | FLAG_END_STREAM,
            3,
            &block2,
        ));

        let out = run(input).await.unwrap();
        assert_eq!(&out[..24], PREFACE);
        let fs = frames(&out[24..]);
        assert_eq!(fs.len(), 4);
        assert_eq!(
            frame(fs[0].0, fs[0].1, fs[0].2, &fs[0].3),
            settings,
            "SETTINGS untouched"
        );
        let mut dec = loona_hpack::Decoder::new();
        let mut expected = request_headers("localhost");
        for (i, stream, end_stream) in [(1, 1, false), (3, 3, true)] {
            let (kind, flags, s, payload) = &fs[i];
            assert_eq!((*kind, *s), (TYPE_HEADERS, stream));
            assert_eq!(flags & FLAG_END_HEADERS, FLAG_END_HEADERS);
            assert_eq!(flags & FLAG_END_STREAM != 0, end_stream);
            assert_eq!(dec.decode(payload).unwrap(), expected);
        }
        assert_eq!(fs[2].3, [0, 0, 0, 0, 0], "DATA untouched");
        expected.clear();
    }

    fn padded_priority_headers(authority: &str) -> Vec<u8> {
        let mut enc = loona_hpack::Encoder::new();
        let headers = request_headers(authority);
        let block = enc.encode(headers.iter().map(|(n, v)| (n.as_slice(), v.as_slice())));
        let (a, b) = block.split_at(block.len() / 2);
        let mut payload = vec![3u8]; // pad length
        payload.extend([0x80, 0, 0, 1, 16]); // exclusive dependency on stream 1, weight 16
        payload.extend(a);
        payload.extend([0, 0, 0]);
        let mut input = PREFACE.to_vec();
        input.extend(frame(
            TYPE_HEADERS,
            FLAG_PADDED | FLAG_PRIORITY,
            3,
            &payload,
        ));
        input.extend(frame(TYPE_CONTINUATION, FLAG_END_HEADERS, 3, b));
        input
    }

    #[tokio::test]
    async fn a_first_block_with_a_plain_authority_is_remembered_and_the_next_connection_skips_decoding()
     {
        // A host name no other test uses, so that this block is this test's own.
        let (block, input) = first_block("remembered.example");
        assert!(!known_plain(&block));
        assert_eq!(run(input.clone()).await.unwrap(), input);
        assert!(known_plain(&block), "remembered after the first connection");
        // The next connection with the same bytes passes through (without a decode).
        let (mut client, server) = tokio::io::duplex(1 << 16);
        client.write_all(&input).await.unwrap();
        client.shutdown().await.unwrap();
        let mut fix = AuthorityFix::new(server);
        let mut out = Vec::new();
        fix.read_to_end(&mut out).await.unwrap();
        assert_eq!(out, input);
        assert_eq!(fix.mode, Mode::Passthrough);
        // A non-plain authority is never remembered, so it is rewritten every time.
        let (_, bad) = first_block("tmp%2Fx.sock");
        for _ in 0..2 {
            let out = run(bad.clone()).await.unwrap();
            assert_ne!(out, bad);
        }
    }

    /// A connection's first request header block for `authority`, and the connection's
    /// bytes up to it (preface, one HEADERS frame).
    fn first_block(authority: &str) -> (Vec<u8>, Vec<u8>) {
        let mut enc = loona_hpack::Encoder::new();
        let headers = request_headers(authority);
        let block = enc.encode(headers.iter().map(|(n, v)| (n.as_slice(), v.as_slice())));
        let mut input = PREFACE.to_vec();
        input.extend(frame(TYPE_HEADERS, FLAG_END_HEADERS, 1, &block));
        (block, input)
    }

    #[test]
    fn remembered_blocks_are_bounded_in_number_and_size() {
        for i in 0..(KNOWN_PLAIN + 8) {
            remember_plain(format!("bounded-{i}").as_bytes());
        }
        assert!(PLAIN_FIRST_BLOCKS.lock().unwrap().len() <= KNOWN_PLAIN);
        assert!(known_plain(
            format!("bounded-{}", KNOWN_PLAIN + 7).as_bytes()
        ));
        let big = vec![b'x'; KNOWN_PLAIN_BYTES + 1];
        remember_plain(&big);
        assert!(!known_plain(&big));
    }

    #[tokio::test]
    async fn a_valid_authority_passes_through_byte_for_byte() {
        let input = padded_priority_headers("localhost:1234");
        assert_eq!(run(input.clone()).await.unwrap(), input);
    }

    #[tokio::test]
    async fn padding_priority_and_continuation_are_handled_when_rewriting() {
        let out = run(padded_priority_headers("tmp%2Fs")).await.unwrap();
        let fs = frames(&out[24..]);
        assert_eq!(fs.len(), 1);
        let (kind, flags, _, payload) = &fs[0];
        assert_eq!(*kind, TYPE_HEADERS);
        assert_eq!(flags & FLAG_PADDED, 0);
        assert_eq!(flags & FLAG_PRIORITY, FLAG_PRIORITY);
        assert_eq!(&payload[..5], &[0x80, 0, 0, 1, 16]);
        let mut dec = loona_hpack::Decoder::new();
        assert_eq!(
            dec.decode(&payload[5..]).unwrap(),
            request_headers("localhost")
        );
    }

    #[tokio::test]
    async fn after_a_valid_first_block_everything_passes_through() {
        let mut enc = loona_hpack::Encoder::new();
        let headers = request_headers("localhost");
        let mut input = PREFACE.to_vec();
        for stream in [1u32, 3, 5] {
            let block = enc.encode(headers.iter().map(|(n, v)| (n.as_slice(), v.as_slice())));
            input.extend(frame(
                TYPE_HEADERS,
                FLAG_END_HEADERS | FLAG_END_STREAM,
                stream,
                &block,
            ));
        }
        // Once passing through, what follows is h2's business, even garbage.
        input.extend([0xde, 0xad]);
        assert_eq!(run(input.clone()).await.unwrap(), input);
    }

    #[tokio::test]
    async fn a_large_block_is_split_into_continuations() {
        let mut headers = request_headers("x%2Fy");
        headers.push((b"x-big".to_vec(), vec![b'a'; 40_000]));
        let mut enc = loona_hpack::Encoder::new();
        let block = enc.encode(headers.iter().map(|(n, v)| (n.as_slice(), v.as_slice())));
        let mut input = PREFACE.to_vec();
        let (a, b) = block.split_at(16_000);
        let (b, c) = b.split_at(16_000);
        input.extend(frame(TYPE_HEADERS, 0, 1, a));
        input.extend(frame(TYPE_CONTINUATION, 0, 1, b));
        input.extend(frame(TYPE_CONTINUATION, FLAG_END_HEADERS, 1, c));
        let out = run(input).await.unwrap();
        let fs = frames(&out[24..]);
        assert!(fs.len() >= 3);
        assert!(fs.iter().all(|f| f.3.len() <= MAX_EMIT_FRAME));
        assert_eq!(fs[0].0, TYPE_HEADERS);
        assert!(fs[1..].iter().all(|f| f.0 == TYPE_CONTINUATION));
        assert_eq!(fs.last().unwrap().1 & FLAG_END_HEADERS, FLAG_END_HEADERS);
        let block: Vec<u8> = fs.iter().flat_map(|f| f.3.clone()).collect();
        let got = loona_hpack::Decoder::new().decode(&block).unwrap();
        assert_eq!(got[3], (b":authority".to_vec(), b"localhost".to_vec()));
        assert_eq!(got[6].1.len(), 40_000);
    }

    #[tokio::test]
    async fn malformed_input_closes_the_connection() {
        let mut input = PREFACE.to_vec();
        input.extend(frame(TYPE_CONTINUATION, FLAG_END_HEADERS, 1, b"x"));
        assert!(run(input).await.is_err());
        let mut input = PREFACE.to_vec();
        input.extend(frame(
            TYPE_HEADERS,
            FLAG_END_HEADERS,
            1,
            &[0xff, 0xff, 0xff, 0xff],
        ));
        assert!(run(input).await.is_err());
    }

    /// Found by `properties::hpack_references_cannot_inflate_a_header_block`: a header
    /// block of one-byte references to a long header in the dynamic table decoded to
    /// hundreds of times its size.
    #[tokio::test]
    async fn a_header_block_that_decodes_past_the_cap_closes_the_connection() {
        let ok = properties::hpack_bomb(4096, 1000, 10);
        assert!(run(ok).await.is_ok());
        let bomb = properties::hpack_bomb(4096, 4000, 20_000);
        let e = run(bomb).await.unwrap_err();
        assert!(e.to_string().contains("header list too large"), "{e}");
    }

    /// A client may not announce a dynamic table larger than HTTP/2's default.
    #[tokio::test]
    async fn a_dynamic_table_larger_than_the_default_is_refused() {
        assert!(run(properties::hpack_bomb(4096, 100, 1)).await.is_ok());
        let e = run(properties::hpack_bomb(4097, 100, 1)).await.unwrap_err();
        assert!(e.to_string().contains("bad header block"), "{e}");
    }

    #[test]
    fn integers_encode_per_rfc_7541() {
        // RFC 7541 C.1.1-C.1.3.
        let mut v = Vec::new();
        encode_int(&mut v, 0, 5, 10);
        assert_eq!(v, [10]);
        v.clear();
        encode_int(&mut v, 0, 5, 1337);
        assert_eq!(v, [31, 154, 10]);
        v.clear();
        encode_int(&mut v, 0, 8, 42);
        assert_eq!(v, [42]);
    }

    mod properties {
        use super::*;
        use carapace_fuzzkit::proptest::prelude::*;
        use carapace_fuzzkit::{bounded, config, mutated};

        /// Runs the layer over `input` in one piece, as a workload's bytes arrive.
        fn feed(input: &[u8]) -> io::Result<Vec<u8>> {
            let mut fix = AuthorityFix::new(());
            fix.input.extend_from_slice(input);
            fix.process()?;
            Ok(fix.output)
        }

        fn connection(authority: &str) -> Vec<u8> {
            let mut enc = loona_hpack::Encoder::new();
            let headers = request_headers(authority);
            let mut input = PREFACE.to_vec();
            input.extend(frame(0x4, 0, 0, &[0, 3, 0, 0, 0, 100]));
            for stream in [1u32, 3] {
                let block = enc.encode(headers.iter().map(|(n, v)| (n.as_slice(), v.as_slice())));
                input.extend(frame(TYPE_HEADERS, FLAG_END_HEADERS, stream, &block));
                input.extend(frame(0x0, FLAG_END_STREAM, stream, &[0, 0, 0, 0, 0]));
            }
            input
        }

        /// A header block that raises the dynamic table size, adds one header of
        /// `value_len` bytes to it, and has a non-host authority (so every block is
        /// decoded); then `refs` one-byte references to that header in the next block.
        pub(super) fn hpack_bomb(table_size: usize, value_len: usize, refs: usize) -> Vec<u8> {
            let mut first = Vec::new();
            encode_int(&mut first, 0x20, 5, table_size);
            first.push(0x40); // literal with incremental indexing, new name
            encode_int(&mut first, 0, 7, 1);
            first.push(b'x');
            encode_int(&mut first, 0, 7, value_len);
            first.extend(std::iter::repeat_n(b'v', value_len));
            for (n, v) in request_headers("tmp%2Fagent%2Fapi.sock") {
                first.push(0x00);
                encode_int(&mut first, 0, 7, n.len());
                first.extend(n);
                encode_int(&mut first, 0, 7, v.len());
                first.extend(v);
            }
            let second = vec![0x80 | 62; refs]; // indexed: the newest dynamic entry
            let mut input = PREFACE.to_vec();
            for (stream, block) in [(1u32, first), (3, second)] {
                let mut chunks = block.chunks(MAX_EMIT_FRAME).peekable();
                let mut kind = TYPE_HEADERS;
                while let Some(chunk) = chunks.next() {
                    let flags = if chunks.peek().is_none() {
                        FLAG_END_HEADERS
                    } else {
                        0
                    };
                    input.extend(frame(kind, flags, stream, chunk));
                    kind = TYPE_CONTINUATION;
                }
            }
            input
        }

        proptest! {
            #![proptest_config(config(1500))]

            /// Mutated connections: never a panic; what the layer hands h2 holds no
            /// more than it was given plus the re-encoding, and the allocation bound
            /// holds.
            #[test]
            fn connections_never_panic_and_stay_bounded(input in mutated(vec![
                connection("tmp%2Fagent%2Fapi.sock"),
                connection("localhost"),
            ])) {
                let _ = bounded("HTTP/2 input", input.len(), || feed(&input));
            }
        }

        proptest! {
            #![proptest_config(config(64))]

            /// HPACK's dynamic table lets a few bytes stand for a large header: the
            /// decoded size is capped, whatever table size the client announces.
            #[test]
            fn hpack_references_cannot_inflate_a_header_block(
                table_size in prop_oneof![Just(4096usize), Just(1 << 16), Just(1 << 20), Just(1 << 30)],
                value_len in 100usize..16_000,
                refs in 1usize..4000,
            ) {
                let input = hpack_bomb(table_size, value_len, refs);
                if let Ok(out) = bounded("HTTP/2 input", input.len(), || feed(&input)) {
                    // Two header blocks, each at most the decoded cap (plus framing).
                    let most = input.len() + 2 * (MAX_HEADER_LIST + 4 * FRAME_HEADER_LEN + 64);
                    prop_assert!(out.len() <= most, "{} bytes in, {} out", input.len(), out.len());
                }
            }
        }
    }
}
