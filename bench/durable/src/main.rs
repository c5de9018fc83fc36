//! What one durable write costs on this disk, three ways: `bash bench/durable.sh`.
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::time::Instant;

const N: usize = 2000;
const RECORD: usize = 200;

fn report(what: &str, records: usize, t: Instant) {
    let s = t.elapsed().as_secs_f64();
    println!("{what:<48} {:>9.0} records/s  {:>7.1} us/record", records as f64 / s, s * 1e6 / records as f64);
}

fn main() {
    let dir = std::env::args().nth(1).unwrap_or_else(|| "/tmp/walbench-data".into());
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let payload = vec![b'x'; RECORD];

    // the disk's own flush: a 4 KiB rewrite + fdatasync
    let f = std::fs::OpenOptions::new().create(true).write(true).read(true).open(format!("{dir}/raw")).unwrap();
    f.write_all_at(&[0u8; 4096], 0).unwrap();
    f.sync_all().unwrap();
    let t = Instant::now();
    for _ in 0..N {
        f.write_all_at(&[1u8; 4096], 0).unwrap();
        f.sync_data().unwrap();
    }
    report("disk: 4 KiB rewrite + fdatasync", N, t);

    for group in [1usize, 64] {
        // an append-only log: length, crc32, payload; one fdatasync per group
        let mut log = std::fs::OpenOptions::new().create(true).append(true).open(format!("{dir}/log-{group}")).unwrap();
        let t = Instant::now();
        let mut buf = Vec::new();
        for i in 0..N {
            buf.extend_from_slice(&(RECORD as u32).to_le_bytes());
            buf.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
            buf.extend_from_slice(&payload);
            if (i + 1) % group == 0 {
                log.write_all(&buf).unwrap();
                log.sync_data().unwrap();
                buf.clear();
            }
        }
        report(&format!("own log, {group} record(s) per fdatasync"), N, t);

        // the same into a segment written with zeros beforehand: an fdatasync then has no
        // file size or block allocation to flush, only the data
        let segment = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(format!("{dir}/segment-{group}"))
            .unwrap();
        segment.write_all_at(&vec![0u8; N * (RECORD + 8)], 0).unwrap();
        segment.sync_all().unwrap();
        let t = Instant::now();
        let mut at = 0u64;
        for i in 0..N {
            buf.extend_from_slice(&(RECORD as u32).to_le_bytes());
            buf.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
            buf.extend_from_slice(&payload);
            if (i + 1) % group == 0 {
                segment.write_all_at(&buf, at).unwrap();
                segment.sync_data().unwrap();
                at += buf.len() as u64;
                buf.clear();
            }
        }
        report(&format!("own log, preallocated, {group} record(s) per fdatasync"), N, t);

        // redb, as the store commits today (Durability::Immediate)
        let db = redb::Database::create(format!("{dir}/redb-{group}")).unwrap();
        const T: redb::TableDefinition<'_, u128, &[u8]> = redb::TableDefinition::new("m");
        let t = Instant::now();
        let mut i = 0u128;
        while (i as usize) < N {
            let mut txn = db.begin_write().unwrap();
            txn.set_durability(redb::Durability::Immediate).unwrap();
            {
                let mut table = txn.open_table(T).unwrap();
                for _ in 0..group {
                    table.insert(i, payload.as_slice()).unwrap();
                    i += 1;
                }
            }
            txn.commit().unwrap();
        }
        report(&format!("redb, {group} record(s) per Immediate commit"), N, t);

        // fjall: inserts journaled, one persist(SyncData) per group
        let db = fjall::Database::builder(format!("{dir}/fjall-{group}")).open().unwrap();
        let ks = db.keyspace("m", fjall::KeyspaceCreateOptions::default).unwrap();
        let t = Instant::now();
        for i in 0..N {
            ks.insert((i as u128).to_be_bytes(), payload.as_slice()).unwrap();
            if (i + 1) % group == 0 {
                db.persist(fjall::PersistMode::SyncData).unwrap();
            }
        }
        report(&format!("fjall, {group} record(s) per persist(SyncData)"), N, t);
    }
}
