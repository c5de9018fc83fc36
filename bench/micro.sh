#!/usr/bin/env bash
# criterion benchmarks of the request path's hot spots (bench/micro/benches/hot_paths.rs):
#
#   bash bench/micro.sh              # all of them
#   bash bench/micro.sh policies     # those whose name contains "policies"
#
# A cargo workspace of its own, so the test build never compiles criterion. Builds with fat LTO,
# like the `dist` profile the image and the other benchmarks use.
set -euo pipefail
cd "$(dirname "$0")/micro"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/outrigger-target}/micro
cargo bench --bench hot_paths -- "$@"
