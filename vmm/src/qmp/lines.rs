//! Reading QEMU's newline-terminated messages with a bound on their length and, where asked,
//! a deadline: a peer that sends garbage, drips bytes or never ends a line gets an error.

use std::io::{self, Read};
use std::os::unix::net::UnixStream;
use std::time::Instant;

/// The longest line accepted from QEMU. The largest reply QEMU sends to anything
/// (`query-qmp-schema`) is 207 KB on one line on 7.2, 236 KB on 10.0; the replies this crate asks for are under
/// 2 KiB. 1 MiB leaves room for both while bounding what a broken peer can make us buffer.
pub const MAX_LINE_BYTES: usize = 1 << 20;

/// How much to read from the socket at once: several typical messages per system call.
const READ_CHUNK_BYTES: usize = 8192;

/// Why no line could be read.
#[derive(Debug, thiserror::Error)]
pub enum LineError {
    /// The peer closed the connection between messages.
    #[error("the peer closed the connection")]
    Closed,
    /// The peer closed the connection in the middle of a message.
    #[error("the peer closed the connection in the middle of a message ({partial_bytes} bytes without a line end)")]
    ClosedMidMessage {
        /// How many bytes of the unfinished message had arrived.
        partial_bytes: usize,
    },
    /// A line grew past [`MAX_LINE_BYTES`] without ending.
    #[error("a message longer than {limit} bytes without a line end")]
    TooLong {
        /// The bound it crossed.
        limit: usize,
    },
    /// The deadline passed before a whole line arrived.
    #[error("no complete message before the deadline")]
    Deadline,
    /// Reading the socket failed.
    #[error("reading the socket failed")]
    Io(#[source] io::Error),
}

/// Splits a stream into lines.
pub(crate) struct LineReader {
    stream: UnixStream,
    // Invariant: holds no complete line after `read_line` returns (lines are taken out as
    // soon as they are found), and at most MAX_LINE_BYTES + READ_CHUNK_BYTES bytes.
    buffer: Vec<u8>,
    max_line_bytes: usize,
}

impl LineReader {
    pub(crate) fn new(stream: UnixStream) -> Self {
        LineReader {
            stream,
            buffer: Vec::new(),
            max_line_bytes: MAX_LINE_BYTES,
        }
    }

    /// Returns the next line without its line end. With a `deadline`, gives up with
    /// [`LineError::Deadline`] when it passes; without one, blocks until a line, an error or
    /// the end of the stream (the socket must then have no read timeout).
    pub(crate) fn read_line(&mut self, deadline: Option<Instant>) -> Result<Vec<u8>, LineError> {
        let mut searched = 0;
        loop {
            if let Some(offset) = self.buffer[searched..].iter().position(|&b| b == b'\n') {
                let end = searched + offset;
                let mut line: Vec<u8> = self.buffer.drain(..=end).collect();
                line.pop();
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                return Ok(line);
            }
            searched = self.buffer.len();
            if self.buffer.len() > self.max_line_bytes {
                return Err(LineError::TooLong {
                    limit: self.max_line_bytes,
                });
            }
            if let Some(deadline) = deadline {
                let remaining = deadline.saturating_duration_since(Instant::now());
                if remaining.is_zero() {
                    return Err(LineError::Deadline);
                }
                self.stream
                    .set_read_timeout(Some(remaining))
                    .map_err(LineError::Io)?;
            }
            let mut chunk = [0u8; READ_CHUNK_BYTES];
            match self.stream.read(&mut chunk) {
                Ok(0) if self.buffer.is_empty() => return Err(LineError::Closed),
                Ok(0) => {
                    return Err(LineError::ClosedMidMessage {
                        partial_bytes: self.buffer.len(),
                    })
                }
                Ok(n) => self.buffer.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) && deadline.is_some() => {}
                Err(e) => return Err(LineError::Io(e)),
            }
        }
    }

    /// Stops applying a read timeout: the reader thread blocks until the socket is shut down.
    pub(crate) fn clear_timeout(&self) -> io::Result<()> {
        self.stream.set_read_timeout(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::time::Duration;

    fn pair() -> (UnixStream, LineReader) {
        let (a, b) = UnixStream::pair().expect("socketpair");
        (a, LineReader::new(b))
    }

    #[test]
    fn splits_lines_and_strips_crlf() {
        let (mut tx, mut rx) = pair();
        tx.write_all(b"one\r\ntwo\nthr").expect("write");
        assert_eq!(rx.read_line(None).expect("line"), b"one");
        assert_eq!(rx.read_line(None).expect("line"), b"two");
        tx.write_all(b"ee\r\n").expect("write");
        assert_eq!(rx.read_line(None).expect("line"), b"three");
        drop(tx);
        assert!(matches!(rx.read_line(None), Err(LineError::Closed)));
    }

    #[test]
    fn end_of_stream_mid_line_is_reported() {
        let (mut tx, mut rx) = pair();
        tx.write_all(b"{\"return\": ").expect("write");
        drop(tx);
        assert!(matches!(
            rx.read_line(None),
            Err(LineError::ClosedMidMessage { partial_bytes: 11 })
        ));
    }

    #[test]
    fn a_line_without_end_is_bounded() {
        let (mut tx, mut rx) = pair();
        rx.max_line_bytes = 100_000;
        let writer = std::thread::spawn(move || {
            let junk = [b'x'; 4096];
            // Stops when the reader gives up and drops its end.
            while tx.write_all(&junk).is_ok() {}
        });
        assert!(matches!(
            rx.read_line(None),
            Err(LineError::TooLong { limit: 100_000 })
        ));
        drop(rx);
        writer.join().expect("writer thread");
    }

    #[test]
    fn a_silent_peer_meets_the_deadline() {
        let (_tx, mut rx) = pair();
        let started = Instant::now();
        let deadline = started + Duration::from_millis(100);
        assert!(matches!(
            rx.read_line(Some(deadline)),
            Err(LineError::Deadline)
        ));
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}
