//! Schematic capture API: payload types and the HTTP client.

pub mod client;
pub mod event;
