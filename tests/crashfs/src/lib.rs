//! ferry's power-cut test tools.
//!
//! - `ferry-crashfs` (`fs`, `model`, `control`): a FUSE filesystem held in memory that remembers,
//!   for every file and directory, what was made durable by `fsync`/`fdatasync` and what was only
//!   written. On command it cuts the power (everything not synced is discarded, or a random prefix
//!   of it kept, or the last write torn), and after a remount presents what survived. It can also
//!   delay every fsync, like a slow SD card (by a fixed time, or each by its own seeded random
//!   time so that syncs overlap and finish out of order), and fail chosen fsyncs with EIO as Linux
//!   does after a writeback error: the file's unsynced changes are dropped (reads still show them
//!   until the next cut, nothing makes them durable), and every open file description of the file
//!   gets EIO from its next fsync, once; then its fsyncs succeed.
//! - `ferry-torture` (`torture`): runs mosquitto, `ferry-cloud` and `ferry` with its journal on
//!   that filesystem, publishes numbered QoS1 messages, cuts the power at random moments, and
//!   checks that every message the broker accepted reached the cloud exactly once, that `seq`
//!   never went backwards and that the journal always opened.
//!
//! Mounting is pure Rust (`fuser` without libfuse): `mount(2)` when root, `fusermount3` otherwise.

pub mod control;
pub mod fs;
pub mod model;
pub mod torture;
