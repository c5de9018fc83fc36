//! Read buffers, taken when a connection's bytes arrive and given back when it goes idle: each
//! thread keeps a few, so a request does not pay an 8 KiB allocation on each side, and an idle
//! connection holds none.

use std::cell::RefCell;
use std::io;

use bytes::BytesMut;
use tokio::io::Interest;
use tokio::net::TcpStream;

/// The room a read is given.
pub(crate) const READ_SIZE: usize = 8 * 1024;
/// Buffers kept per thread; more are freed.
const KEPT: usize = 32;

thread_local! {
    static FREE: RefCell<Vec<BytesMut>> = const { RefCell::new(Vec::new()) };
}

/// An empty buffer with room for a read.
pub(crate) fn take() -> BytesMut {
    let kept = FREE.with(|free| free.borrow_mut().pop());
    kept.unwrap_or_else(|| BytesMut::with_capacity(READ_SIZE))
}

/// Gives `buf` back for another connection. Bytes split off it and still in use stay valid:
/// the buffer only ever writes into its own spare room, and reclaims the rest when they end.
pub(crate) fn give(mut buf: BytesMut) {
    if buf.capacity() < READ_SIZE / 2 {
        return;
    }
    buf.clear();
    FREE.with(|free| {
        let mut free = free.borrow_mut();
        if free.len() < KEPT {
            free.push(buf);
        }
    });
}

/// Reads what `stream` has into `buf`, as `try_read_buf` does; a read that leaves room in `buf`
/// has drained the socket, so its readiness is forgotten and the next read waits for epoll
/// instead of asking the kernel for bytes that are not there. That saves a `recvfrom` answered
/// `EAGAIN` on each side of every request (tokio's `AsyncRead` does the same; `try_read_buf` does
/// not). The readiness is cleared only if no event arrived since it was read (tokio's tick), so
/// bytes that come in meanwhile still wake the reader.
pub(crate) fn read_drained(stream: &TcpStream, buf: &mut BytesMut) -> io::Result<usize> {
    let room = buf.capacity() - buf.len();
    let mut drained = None;
    stream
        .try_io(Interest::READABLE, || {
            let n = stream.try_read_buf(buf)?;
            if 0 < n && n < room {
                drained = Some(n);
                return Err(io::ErrorKind::WouldBlock.into());
            }
            Ok(n)
        })
        .or_else(|e| drained.ok_or(e))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::net::TcpListener;

    use super::*;

    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        (client, listener.accept().await.unwrap().0)
    }

    async fn ready(stream: &TcpStream) {
        let wait = std::future::poll_fn(|cx| stream.poll_read_ready(cx));
        tokio::time::timeout(Duration::from_secs(5), wait).await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn a_short_read_forgets_the_readiness_and_later_bytes_still_wake_the_reader() {
        let (peer, stream) = pair().await;
        peer.try_write(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        ready(&stream).await;
        let mut buf = BytesMut::with_capacity(64);
        assert_eq!(read_drained(&stream, &mut buf).unwrap(), 18);

        // bytes sent now are in the kernel, but the reactor has not run: the readiness was
        // forgotten, so no read is tried (a plain try_read_buf would have read them)
        peer.try_write(b"next").unwrap();
        let e = stream.try_read_buf(&mut buf).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);

        // and their event still wakes the reader
        ready(&stream).await;
        assert_eq!(read_drained(&stream, &mut buf).unwrap(), 4);
        assert_eq!(&buf[..], b"GET / HTTP/1.1\r\n\r\nnext");
    }

    #[tokio::test]
    async fn a_read_that_fills_the_buffer_keeps_the_readiness_for_the_rest() {
        let (peer, stream) = pair().await;
        peer.try_write(&[b'x'; 100]).unwrap();
        ready(&stream).await;
        let mut buf = BytesMut::with_capacity(10);
        let first = read_drained(&stream, &mut buf).unwrap();
        assert_eq!(first, buf.capacity());
        let mut rest = BytesMut::with_capacity(200);
        assert_eq!(read_drained(&stream, &mut rest).unwrap(), 100 - first);
    }

    #[tokio::test]
    async fn the_end_of_the_stream_reads_as_zero() {
        let (peer, stream) = pair().await;
        drop(peer);
        ready(&stream).await;
        assert_eq!(read_drained(&stream, &mut BytesMut::with_capacity(8)).unwrap(), 0);
    }
}
