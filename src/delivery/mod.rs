//! Delivery to Schematic: retry policy (pure), and later the worker.

pub mod retry;
