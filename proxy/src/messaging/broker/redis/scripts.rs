//! The Lua scripts the broker runs: each state change that touches more than one key runs as
//! one script, so it happens whole or not at all. The scripts are in `scripts/*.lua`.

/// Appends a batch of one queue's envelopes, in order, each unless its id was relayed within
/// the window (its marker, one key per message). With an ordering key, the id is also appended
/// to the key's order list of every group that consumes the queue in order (the set KEYS[2]):
/// that list, not the moment a replica happens to read it, decides which message of the key
/// goes next.
pub(super) const RELAY: &str = include_str!("scripts/relay.lua");

/// May this message of an ordered group go now? KEYS the key's order list and waiting list;
/// ARGV message id, the waiting member (`ID\nATTEMPTS\nENVELOPE`). 1: it is the key's head (or
/// the list does not know it: no order to keep). 0: an earlier message of the key is not
/// settled; it waits in the waiting list until that one is.
pub(super) const ACQUIRE: &str = include_str!("scripts/acquire.lua");

/// A message of an ordered group was settled (acknowledged or dead-lettered): the key's next
/// message, if it already waits, goes to the group's retry stream. KEYS order list, waiting
/// list, retry stream; ARGV message id.
pub(super) const RELEASE: &str = include_str!("scripts/release.lua");

/// Moves parked messages that are due back to the stream.
pub(super) const PROMOTE: &str = include_str!("scripts/promote.lua");

/// Appends a dead letter and indexes it by message id (the same message dead-lettered again
/// keeps one entry), then applies the retention: past ARGV[3] entries the oldest go, and those
/// dead-lettered at or before Unix ms ARGV[4]; at most 64 of each per call.
pub(super) const DEAD_LETTER: &str = include_str!("scripts/dead_letter.lua");

/// Removes one dead letter by message id; 1 when there was one.
pub(super) const DELETE_DEAD_LETTER: &str = include_str!("scripts/delete_dead_letter.lua");

/// Moves one dead letter back to its queue's stream: KEYS dead-letter stream, its index, the
/// queue's stream; ARGV message id, the replayed envelope. 1 when it was there.
pub(super) const REPLAY: &str = include_str!("scripts/replay.lua");

/// Trims a queue's stream below what every consumer group has read and settled: the oldest
/// pending entry of each group, or its last delivered entry. No group, no trim.
pub(super) const TRIM: &str = include_str!("scripts/trim.lua");

/// One queue as a consumer group sees it: KEYS the stream, the group's delayed set and retry
/// stream, the dead-letter stream; ARGV the group. Returns {depth, oldest ms or -1,
/// dead letters, oldest dead letter ms or -1}. Times are stream entry times (when relayed or
/// dead-lettered).
pub(super) const DEPTH: &str = include_str!("scripts/depth.lua");

/// Moves a queue's dead letters from the layout one Redis used before they shared the queue's
/// slot (`outrigger:{D}`): KEYS the legacy stream and index, the new stream and index; ARGV the
/// queue. Only on one Redis, where keys of two slots may meet in a script.
pub(super) const MIGRATE_DEAD_LETTERS: &str = include_str!("scripts/migrate_dead_letters.lua");
