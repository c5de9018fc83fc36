#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| outrigger_proxy::fuzz::wal_frames(data));
