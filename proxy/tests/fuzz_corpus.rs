//! Every input kept in `fuzz/corpus/TARGET` (and every crash turned into one) replayed through
//! its fuzz target on the stable toolchain: the fuzz corpora are regression tests too, run by
//! the test command. `bash scripts/fuzz` grows them.

use std::path::{Path, PathBuf};

fn corpus(target: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus").join(target);
    let mut inputs: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.expect("a corpus entry").path())
        .collect();
    inputs.sort();
    assert!(!inputs.is_empty(), "{} holds no input", dir.display());
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
