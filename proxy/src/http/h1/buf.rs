//! Read buffers, taken when a connection's bytes arrive and given back when it goes idle: each
//! thread keeps a few, so a request does not pay an 8 KiB allocation on each side, and an idle
//! connection holds none.

use std::cell::RefCell;

use bytes::BytesMut;

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
