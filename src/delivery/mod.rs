//! Delivery to Schematic: the mapper (events → deliveries), the retry policy
//! (pure), and the worker that claims, sends and records.

pub mod mapper;
pub mod retry;
pub mod worker;
