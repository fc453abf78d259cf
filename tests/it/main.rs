//! Integration tests against a real Postgres: one binary (one link, one throwaway server),
//! a module per area. Each test gets a fresh database of its own.

mod acme;
mod actions;
mod backend;
mod batch_statements;
mod cleanup;
mod cli;
mod common;
mod compat;
mod connect;
mod connect_batch;
mod events;
mod group_commit;
mod keys;
mod leader;
mod least_privilege;
mod limits;
mod nodes;
mod open;
mod partitions;
mod plane055;
mod scheduling;
mod status_stream;
mod upgrade;
mod write_path;
