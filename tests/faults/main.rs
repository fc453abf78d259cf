//! The fault suite (issue 4): real faults against real Postgres, concurrency, malformed rows,
//! hostile input, property tests and the token-storage property.
//!
//! A binary of its own, on purpose: it gets its own throwaway server, so its heavy scenarios
//! (32 writers, killed connections) neither slow down nor disturb the functional tests in
//! `tests/it`, and the figures it prints are measured without them. The restart scenario
//! uses a server private to that one test.
//!
//! Each scenario prints one `FIGURES` line; see them with
//! `cargo test --test faults -- --nocapture`. RELIABILITY.md records the last run.

#[allow(dead_code)]
#[path = "../it/common.rs"]
mod common;

mod bad_config;
mod bad_rows;
mod batch_kill;
mod connect_batch_kill;
mod connect_race;
mod crash;
mod failover;
mod hostile;
mod least_privilege;
mod listener_kill;
mod multihost;
mod open_transaction;
mod pooler;
mod prepared;
mod promotion;
mod properties;
mod reader_kill;
mod replicas;
mod restart;
mod restore;
mod row_lock;
mod security;
mod slow_subscriber;
mod support;
mod tls;
