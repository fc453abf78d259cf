-- Leader leases: one row per lease name (e.g. 'maintenance'), naming the one controller that
-- runs the fleet's periodic work (cleanup) until `expires_at` (server clock). Every new
-- leader gets a larger `term`; renewal and resignation touch only their own term, and
-- fenced work checks its term in the same statement (see RELIABILITY.md, "One cleaner for
-- the fleet"). Additive: older builds ignore the table (and go on cleaning up on their own).
create table leader_lease (
    name text primary key,
    holder text not null,
    term bigint not null,
    elected_at timestamptz not null,
    renewed_at timestamptz not null,
    expires_at timestamptz not null
);

comment on table leader_lease is 'Leader leases: who runs the periodic work of lease `name` (holder, its term), since when (elected_at) and until when (expires_at, server clock).';
