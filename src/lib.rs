//! schematic-sync: Segment events and Engage audiences in, Schematic `track`
//! and `identify` events out, with one SQLite file in between so nothing
//! acknowledged is ever lost.
//!
//! The pure core (no I/O): `segment` (message rules), `mapping` (triggers,
//! fields, names), `schematic::event` (payload types), `delivery::retry`
//! (retry decisions). The I/O shell: `store` (all SQL), `ingest` (HTTP
//! routes and group commit), `server` (the daemon), `cli` (commands).

pub mod audience;
pub mod cli;
pub mod config;
pub mod delivery;
pub mod ingest;
pub mod logging;
pub mod mapping;
pub mod metrics;
pub mod operations;
pub mod scheduler;
pub mod schematic;
pub mod segment;
pub mod server;
pub mod store;
