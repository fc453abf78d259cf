-- A marker of the server's unbroken past, for the event bus.
--
-- The bus compares transaction ids with snapshots, which holds only while the server's
-- transaction counter runs on unbroken. Crash recovery in place (a server process killed,
-- e.g. by the OOM killer: Postgres ends every session and replays its WAL, keeping the
-- postmaster and its start time) can hand out again ids that no flushed WAL recorded, and a
-- promoted standby can do the same with ids of the lost tail. Both empty an UNLOGGED table:
-- crash recovery resets unlogged tables to empty, and a standby never has their rows. So the
-- bus reads this one row in the same statement as its snapshot; when the row is gone or has
-- another id, the past may have changed and the bus re-reads from a safe floor. A clean
-- restart keeps the row (the bus sees the new start time instead).
--
-- Additive: older builds neither read nor write it. Any role that may insert into the other
-- tables may insert here (the first bus to find it empty writes a new id).
create unlogged table plane_server_incarnation (
    singleton boolean primary key default true check (singleton),
    id uuid not null default gen_random_uuid(),
    created_at timestamptz not null default now()
);

comment on table plane_server_incarnation is 'UNLOGGED, one row: a random id that crash recovery and promotion of a standby erase. The event bus reads it with each snapshot; a missing or changed id tells it that transaction ids may have been reused.';
comment on column plane_server_incarnation.singleton is 'Always true: the table holds at most one row.';
comment on column plane_server_incarnation.id is 'Random; written by the first event bus that found the table empty.';
comment on column plane_server_incarnation.created_at is 'When this id was written (after the bus start, crash recovery or promotion that emptied the table).';
