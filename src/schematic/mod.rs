//! Schematic capture API: payload types.

pub mod event;
