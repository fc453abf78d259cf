-- Cleanup runs, so that an operator can see when cleanup last ran and what it deleted
-- (`plane-db status`). Additive: older builds ignore the table. Only the latest runs are
-- kept (cleanup prunes it).
create table cleanup_run (
    id bigserial primary key,
    started_at timestamptz not null,
    finished_at timestamptz not null default now(),
    backends bigint not null,
    events bigint not null,
    tokens bigint not null
);

comment on table cleanup_run is 'Completed cleanup runs (the latest 100): when, and how many backends, events and expired tokens each deleted.';
