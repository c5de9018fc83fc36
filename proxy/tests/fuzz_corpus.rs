//! Every input kept in `fuzz/corpus/TARGET` and `fuzz/regressions/TARGET` (each input that once
//! crashed a target) replayed through its fuzz target on the stable toolchain: the fuzz corpora
//! are regression tests too, run by the test command. `bash scripts/fuzz` grows the corpora;
//! `cargo fuzz cmin` may drop inputs from them, never from `regressions`.

use std::path::{Path, PathBuf};

fn corpus(target: &str) -> Vec<PathBuf> {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let corpus = fuzz.join("corpus").join(target);
    let mut inputs: Vec<PathBuf> = [corpus.clone(), fuzz.join("regressions").join(target)]
        .iter()
        .filter_map(|dir| std::fs::read_dir(dir).ok())
        .flatten()
        .map(|entry| entry.expect("a corpus entry").path())
        .collect();
    inputs.sort();
    assert!(!inputs.is_empty(), "{} holds no input", corpus.display());
    inputs
}

/// Runs `target` on each input of its corpus, naming the input that fails.
fn replay(name: &str, target: fn(&[u8])) {
    for input in corpus(name) {
        let bytes = std::fs::read(&input).expect("a corpus input");
        let run = std::panic::catch_unwind(|| target(&bytes));
        assert!(run.is_ok(), "fuzz target {name} fails on {}", input.display());
    }
}

#[test]
fn the_config_corpus_passes() {
    replay("config", outrigger_proxy::fuzz::config);
}

#[test]
fn the_guard_corpus_passes() {
    replay("guard", outrigger_proxy::fuzz::guard);
}

#[test]
fn the_authority_corpus_passes() {
    replay("authority", outrigger_proxy::fuzz::authority);
}

#[test]
fn the_envelope_corpus_passes() {
    replay("envelope", outrigger_proxy::fuzz::envelope);
}

#[test]
fn the_retry_after_corpus_passes() {
    replay("retry_after", outrigger_proxy::fuzz::retry_after);
}

#[test]
fn the_publish_input_corpus_passes() {
    replay("publish_input", outrigger_proxy::fuzz::publish_input);
}

#[test]
fn the_response_head_corpus_passes() {
    replay("response_head", outrigger_proxy::fuzz::response_head);
}

#[test]
fn the_chunked_corpus_passes() {
    replay("chunked", outrigger_proxy::fuzz::chunked);
}

#[test]
fn the_wal_frames_corpus_passes() {
    replay("wal_frames", outrigger_proxy::fuzz::wal_frames);
}
