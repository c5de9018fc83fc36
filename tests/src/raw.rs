//! A hostile upstream: answers every request head with bytes the test wrote, framing and all,
//! and keeps every byte it received, so a test can play an upstream that lies about its framing
//! and see exactly what the sidecar sent on.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// A running raw upstream; it stops with the test's runtime.
#[derive(Debug, Clone)]
pub struct RawUpstream {
    addr: SocketAddr,
    received: Arc<Mutex<Vec<u8>>>,
    /// Connections accepted, and those the sidecar closed.
    accepted: Arc<AtomicUsize>,
    closed: Arc<AtomicUsize>,
}

impl RawUpstream {
    /// Answers each request head (up to its empty line) with `answer`, then closes the
    /// connection once the peer has sent nothing more for a moment or closed its side.
    pub async fn answering(answer: &'static [u8]) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind a raw upstream");
        let addr = listener.local_addr().expect("a bound address");
        let received = Arc::new(Mutex::new(Vec::new()));
        let kept = received.clone();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counted = accepted.clone();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                counted.fetch_add(1, Ordering::SeqCst);
                let kept = kept.clone();
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 4096];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => {
                                head.extend_from_slice(&buf[..n]);
                                kept.lock().unwrap().extend_from_slice(&buf[..n]);
                            }
                        }
                    }
                    let _ = stream.write_all(answer).await;
                    // keep what else arrives, until the sidecar closes or pauses
                    let pause = std::time::Duration::from_millis(500);
                    while let Ok(Ok(n)) = tokio::time::timeout(pause, stream.read(&mut buf)).await {
                        if n == 0 {
                            break;
                        }
                        kept.lock().unwrap().extend_from_slice(&buf[..n]);
                    }
                });
            }
        });
        Self { addr, received, accepted, closed: Arc::default() }
    }

    /// Answers every request head on a connection with `answer` (requests without bodies),
    /// keeping the connection open until the sidecar closes it.
    pub async fn keep_alive(answer: &'static [u8]) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind a raw upstream");
        let addr = listener.local_addr().expect("a bound address");
        let up = Self {
            addr,
            received: Arc::default(),
            accepted: Arc::default(),
            closed: Arc::default(),
        };
        let (kept, accepted, closed) =
            (up.received.clone(), up.accepted.clone(), up.closed.clone());
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                accepted.fetch_add(1, Ordering::SeqCst);
                let (kept, closed) = (kept.clone(), closed.clone());
                tokio::spawn(async move {
                    let (mut pending, mut buf) = (Vec::new(), [0u8; 4096]);
                    loop {
                        while let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
                            pending.drain(..end + 4);
                            if stream.write_all(answer).await.is_err() {
                                return;
                            }
                        }
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                pending.extend_from_slice(&buf[..n]);
                                kept.lock().unwrap().extend_from_slice(&buf[..n]);
                            }
                        }
                    }
                    closed.fetch_add(1, Ordering::SeqCst);
                });
            }
        });
        up
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Connections the sidecar closed (counted by [`keep_alive`](Self::keep_alive) only).
    pub fn closed(&self) -> usize {
        self.closed.load(Ordering::SeqCst)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Every byte received so far, on every connection, in arrival order.
    pub fn received(&self) -> String {
        String::from_utf8_lossy(&self.received.lock().unwrap()).into_owned()
    }
}
