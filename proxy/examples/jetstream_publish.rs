//! NATS JetStream's own write rate, for `bench/publish.sh`: `CLIENTS` tasks each publish to
//! `SUBJECT` and wait for the server's acknowledgement before the next, for `SECONDS`; prints
//! the acknowledged publishes per second. One connection, as Outrigger's relay uses. The
//! stream `BENCH-RAW` on `SUBJECT` (file storage, as Outrigger's) is made when missing.
//!
//!   jetstream_publish nats://127.0.0.1:4222 SUBJECT CLIENTS SECONDS

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

const PAYLOAD: &[u8] = br#"{"order":42,"customer":"c-7","items":[{"sku":"A-1","qty":2}]}"#;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let [_, url, subject, clients, seconds] = args.as_slice() else {
        return Err("usage: jetstream_publish URL SUBJECT CLIENTS SECONDS".into());
    };
    let (clients, seconds): (usize, u64) = (clients.parse()?, seconds.parse()?);
    let js = async_nats::jetstream::new(async_nats::connect(url.as_str()).await?);
    js.get_or_create_stream(async_nats::jetstream::stream::Config {
        name: "BENCH-RAW".into(),
        subjects: vec![subject.clone()],
        storage: async_nats::jetstream::stream::StorageType::File,
        ..Default::default()
    })
    .await?;
    let acked = Arc::new(AtomicU64::new(0));
    let until = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let (js, acked, subject) = (js.clone(), acked.clone(), subject.clone());
            tokio::spawn(async move {
                while Instant::now() < until {
                    let ack = js.publish(subject.clone(), PAYLOAD.into()).await?;
                    ack.await?;
                    acked.fetch_add(1, Ordering::Relaxed);
                }
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
            })
        })
        .collect();
    for task in tasks {
        task.await?.map_err(|e| e.to_string())?;
    }
    let n = acked.load(Ordering::Relaxed);
    println!(
        "{:.0} publishes/s acknowledged ({n} in {:.1} s)",
        n as f64 / started.elapsed().as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
