#!/usr/bin/env bash
# What one durable write costs on this disk, three ways, with 1 and 64 records per flush:
# a 4 KiB rewrite + fdatasync (the disk), an append-only log of checksummed records with one
# fdatasync per group, redb commits with Durability::Immediate (the store today), and fjall
# inserts with one persist(SyncData) per group. 2000 records of 200 bytes each way.
#
#   bash bench/durable.sh [DIR]     (DIR on the disk that would hold data_dir; default $TMPDIR)
#
# A cargo workspace of its own (bench/durable), so the test build never compiles fjall.
set -euo pipefail
cd "$(dirname "$0")/durable"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/outrigger-target}/durable
cargo build --release --locked -q
dir=${1:-${TMPDIR:-/tmp}}/outrigger-durable-$$
trap 'rm -rf "$dir"' EXIT
"$CARGO_TARGET_DIR/release/outrigger-durable-bench" "$dir"
