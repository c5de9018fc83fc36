//! Idle upstream connections, kept per endpoint: a free list on the endpoint itself (attached
//! to its discovery member), so a checkout is a lock and a pop, with no map to search and no
//! boxed future. A connection is taken back only once its response was read to the end on a
//! keep-alive connection; one idle past `timeouts.idle` is closed by a sweeper that runs while
//! the list is not empty, and the whole list closes with the endpoint when discovery removes it.

use std::io;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::Instant;

/// The idle connections of one endpoint, most recently used last.
#[derive(Debug, Default)]
pub(crate) struct Idle {
    inner: Mutex<List>,
}

#[derive(Debug, Default)]
struct List {
    conns: Vec<(TcpStream, Instant)>,
    /// Whether a sweeper task is running for this list.
    sweeping: bool,
}

/// The most idle connections kept per endpoint; more are closed as they come back.
const MAX_IDLE: usize = 1024;

impl Idle {
    /// The most recently used idle connection the upstream has not closed, if any.
    pub(crate) fn take(&self, idle_timeout: Duration) -> Option<TcpStream> {
        let now = Instant::now();
        loop {
            let (conn, since) = self.list().conns.pop()?;
            if now.saturating_duration_since(since) < idle_timeout && still_open(&conn) {
                return Some(conn);
            }
        }
    }

    /// Keeps `conn` for the next request; starts the sweeper if none runs.
    pub(crate) fn put(self: &Arc<Self>, conn: TcpStream, idle_timeout: Duration) {
        let mut list = self.list();
        if list.conns.len() >= MAX_IDLE {
            return;
        }
        list.conns.push((conn, Instant::now()));
        if !list.sweeping {
            list.sweeping = true;
            tokio::spawn(sweep(Arc::downgrade(self), idle_timeout));
        }
    }

    fn list(&self) -> std::sync::MutexGuard<'_, List> {
        self.inner.lock().expect("no panics under the idle list's lock")
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.list().conns.len()
    }
}

/// Whether an idle connection is still usable: the upstream neither closed it nor sent bytes
/// no request asked for. One non-blocking read, only when the socket is readable.
fn still_open(conn: &TcpStream) -> bool {
    match conn.try_read(&mut [0; 1]) {
        Err(e) => e.kind() == io::ErrorKind::WouldBlock,
        Ok(_) => false,
    }
}

/// Closes the connections of `idle` unused for `idle_timeout`, each about when its time is up;
/// ends once the list is empty or the endpoint is gone.
async fn sweep(idle: Weak<Idle>, idle_timeout: Duration) {
    let mut next = Instant::now() + idle_timeout;
    loop {
        tokio::time::sleep_until(next).await;
        let Some(idle) = idle.upgrade() else { return };
        let mut list = idle.list();
        let now = Instant::now();
        list.conns.retain(|(_, since)| now.saturating_duration_since(*since) < idle_timeout);
        match list.conns.first() {
            Some((_, oldest)) => next = *oldest + idle_timeout,
            None => {
                list.sweeping = false;
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn pair(listener: &tokio::net::TcpListener) -> (TcpStream, TcpStream) {
        let addr = listener.local_addr().unwrap();
        let (client, server) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (client.unwrap(), server.unwrap().0)
    }

    #[tokio::test]
    async fn a_connection_comes_back_until_the_upstream_closes_it() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let idle = Arc::new(Idle::default());
        let (client, server) = pair(&listener).await;
        idle.put(client, Duration::from_secs(60));
        let client = idle.take(Duration::from_secs(60)).expect("kept");
        idle.put(client, Duration::from_secs(60));
        drop(server);
        // the FIN arrives at once on loopback; the check sees it
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
            let Some(client) = idle.take(Duration::from_secs(60)) else { return };
            idle.put(client, Duration::from_secs(60));
        }
        panic!("a connection the upstream closed was still handed out");
    }

    #[tokio::test(start_paused = true)]
    async fn idle_connections_close_after_the_idle_timeout() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let idle = Arc::new(Idle::default());
        let (a, _sa) = pair(&listener).await;
        let (b, _sb) = pair(&listener).await;
        idle.put(a, Duration::from_secs(10));
        tokio::time::sleep(Duration::from_secs(6)).await;
        idle.put(b, Duration::from_secs(10));
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(idle.len(), 1, "the first is swept at 10 s, the second kept");
        assert!(idle.take(Duration::from_secs(10)).is_some());
        idle.put(idle_conn(&listener).await, Duration::from_secs(10));
        tokio::time::sleep(Duration::from_secs(11)).await;
        assert_eq!(idle.len(), 0);
    }

    async fn idle_conn(listener: &tokio::net::TcpListener) -> TcpStream {
        let (client, server) = pair(listener).await;
        std::mem::forget(server);
        client
    }
}
