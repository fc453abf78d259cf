-- no-transaction
--
-- Partitioned history: `event` and `backend_state` become tables partitioned by ranges of
-- `id`, in place, so that retention can detach and drop whole partitions instead of
-- deleting rows one by one (see RELIABILITY.md, "Retention by partitions").
--
-- The rows are not rewritten: each old table is renamed and attached, as it is, as the first
-- partition (ids below a bound B0) of a new partitioned table that takes the old name. Two
-- empty partitions follow ([B0, B0 + 1M), [B0 + 1M, B0 + 2M)) and a last one that is open
-- ended ([B0 + 2M, MAXVALUE)), so that an insert always finds a partition, even if nothing
-- ever creates another one (a fleet of older builds, which know nothing of partitions). The
-- library keeps partitions ahead of the sequence by moving that open-ended one up while it is
-- still empty (src/partition.rs).
--
-- It runs as several short transactions (this file is sent as one simple query; sqlx applies
-- a `no-transaction` migration without wrapping it), under the migration lock like every
-- migration, so that the scan of the old rows happens without an exclusive lock:
--
--   1. `CHECK (id < B0) NOT VALID` on each old table: ACCESS EXCLUSIVE, catalog only, no
--      scan. B0 is at least 1,000,000 ids above the sequence, so concurrent writers never
--      reach it while the migration runs.
--   2. `VALIDATE CONSTRAINT`: one sequential scan of the old table under SHARE UPDATE
--      EXCLUSIVE, which lets every reader and writer carry on.
--   3. Rename, create the partitioned table, attach the old table (the valid CHECK proves
--      its rows fit, so ATTACH does not scan) and the new partitions: ACCESS EXCLUSIVE on
--      the old table for the length of a catalog transaction (milliseconds).
--
-- Every step checks the catalog first, so a migration that failed half way can be applied
-- again. Older builds keep working: the table names, columns, defaults, constraints, the
-- wake-up trigger, plane_write_events() and the foreign key from backend_state to backend
-- are all as before, and inserts, reads and row deletes work on a partitioned table.

begin;
do $$
declare
    t text;
    seq text;
    last bigint;
    bound bigint;
begin
    -- Every lock at once, each try waiting at most 50 ms: a writer holding one of these
    -- tables and waiting for another would otherwise deadlock with this transaction (and
    -- one of the two would fail). Writers wait for this transaction at most that long.
    perform set_config('lock_timeout', '50ms', true);
    loop
        begin
            lock table event, backend_state in access exclusive mode;
            exit;
        exception when lock_not_available then
            perform pg_sleep(0.02);
        end;
    end loop;
    perform set_config('lock_timeout', '0', true);
    foreach t in array array['event', 'backend_state'] loop
        if (select c.relkind from pg_class c where c.oid = t::regclass) = 'r'
           and not exists (select 1 from pg_constraint
                           where conrelid = t::regclass and conname = t || '_id_first_bound') then
            seq := t || '_id_seq';
            execute format('select last_value from %I', seq) into last;
            bound := (greatest(last, 0) / 1000000 + 2) * 1000000;
            execute format('alter table %I add constraint %I check (id < %s) not valid',
                           t, t || '_id_first_bound', bound);
        end if;
    end loop;
end
$$;
commit;

begin;
do $$
declare
    t text;
begin
    foreach t in array array['event', 'backend_state'] loop
        if exists (select 1 from pg_constraint
                   where conrelid = t::regclass and conname = t || '_id_first_bound'
                     and not convalidated) then
            execute format('alter table %I validate constraint %I', t, t || '_id_first_bound');
        end if;
    end loop;
end
$$;
commit;

begin;
do $$
declare
    t text;
    bound bigint;
    grant_row record;
    owner_name text;
begin
    -- Every lock (backend's too: adopting the old foreign key replaces its triggers on
    -- backend) at once, each try waiting at most 50 ms: a writer holding one of these
    -- tables and waiting for another would otherwise deadlock with this transaction (and
    -- one of the two would fail). Writers wait for this transaction at most that long.
    perform set_config('lock_timeout', '50ms', true);
    loop
        begin
            lock table backend in access exclusive mode;
            lock table backend_state, event in access exclusive mode;
            exit;
        exception when lock_not_available then
            perform pg_sleep(0.02);
        end;
    end loop;
    perform set_config('lock_timeout', '0', true);
    foreach t in array array['event', 'backend_state'] loop
        if (select c.relkind from pg_class c where c.oid = t::regclass) <> 'r' then
            continue;
        end if;
        select (regexp_match(pg_get_constraintdef(oid), '(\d+)'))[1]::bigint into bound
        from pg_constraint where conrelid = t::regclass and conname = t || '_id_first_bound';

        execute format('alter table %I rename to %I', t, t || '_p0');
        if t = 'event' then
            alter index event_pkey rename to event_p0_pkey;
            alter index event_xid_idx rename to event_p0_xid_idx;
            alter index event_created_at_idx rename to event_p0_created_at_idx;
            -- The parent's trigger is cloned onto every partition, this one included.
            drop trigger event_wake on event_p0;

            create table event (
                id bigint not null default nextval('event_id_seq'),
                kind text not null constraint event_kind_check check (length(kind) > 0),
                key text,
                created_at timestamptz not null default now(),
                data jsonb not null,
                xid xid8 not null default pg_current_xact_id(),
                constraint event_pkey primary key (id)
            ) partition by range (id);
            create index event_xid_idx on event (xid);
            create index event_created_at_idx on event (created_at);
            create trigger event_wake after insert on event
                for each row execute function plane_event_wake();
            alter sequence event_id_seq owned by event.id;

            comment on table event is 'Persisted events, written in the transaction of the change they report; the event bus reads new rows from here. Partitioned by ranges of id; retention drops whole partitions.';
            comment on column event.id is 'Event id. Taken from a sequence at insert time, so ids are NOT in commit order. The partition key.';
            comment on column event.kind is 'The kind of event (NotificationPayload::kind).';
            comment on column event.key is 'An optional key (e.g. a backend or drone id); with kind it forms the subject subscriptions filter on.';
            comment on column event.created_at is 'When the event was written (database clock).';
            comment on column event.data is 'The event payload as JSON.';
            comment on column event.xid is 'The writing transaction; the bus compares it with snapshots to read exactly the rows committed since its last read.';
        else
            alter index backend_state_pkey rename to backend_state_p0_pkey;
            alter index backend_state_backend_idx rename to backend_state_p0_backend_idx;

            create table backend_state (
                id bigint not null default nextval('backend_state_id_seq'),
                backend_id text not null,
                state jsonb not null,
                created_at timestamptz not null default now(),
                constraint backend_state_pkey primary key (id)
            ) partition by range (id);
            create index backend_state_backend_idx on backend_state (backend_id, id);
            alter sequence backend_state_id_seq owned by backend_state.id;

            comment on table backend_state is 'The history of every backend''s states, appended on each accepted transition. Partitioned by ranges of id; a partition is dropped once none of its rows is left.';
            comment on column backend_state.id is 'Row id; within one backend it follows the order of the transitions. The partition key.';
            comment on column backend_state.backend_id is 'The backend the state belongs to.';
            comment on column backend_state.state is 'The BackendState as JSON.';
            comment on column backend_state.created_at is 'When the transition was accepted (database clock).';
        end if;

        -- Whoever could read or write the old table can read or write the new one (the
        -- least-privilege application role among them).
        for grant_row in
            select a.privilege_type, a.grantee
            from pg_class c, aclexplode(c.relacl) a
            where c.oid = (t || '_p0')::regclass and a.grantee <> c.relowner
        loop
            execute format('grant %s on %I to %s', grant_row.privilege_type, t,
                           case when grant_row.grantee = 0 then 'public'
                                else quote_ident(pg_get_userbyid(grant_row.grantee)) end);
        end loop;
        select pg_get_userbyid(relowner) into owner_name
        from pg_class where oid = (t || '_p0')::regclass;
        if owner_name <> current_user then
            execute format('alter table %I owner to %I', t, owner_name);
        end if;

        execute format('alter table %I attach partition %I for values from (minvalue) to (%s)',
                       t, t || '_p0', bound);
        execute format('create table %I (like %I including defaults including constraints)',
                       t || '_p' || bound, t);
        execute format('alter table %I attach partition %I for values from (%s) to (%s)',
                       t, t || '_p' || bound, bound, bound + 1000000);
        execute format('create table %I (like %I including defaults including constraints)',
                       t || '_p' || (bound + 1000000), t);
        execute format('alter table %I attach partition %I for values from (%s) to (%s)',
                       t, t || '_p' || (bound + 1000000), bound + 1000000, bound + 2000000);
        execute format('create table %I (like %I including defaults including constraints)',
                       t || '_p' || (bound + 2000000), t);
        execute format('alter table %I attach partition %I for values from (%s) to (maxvalue)',
                       t, t || '_p' || (bound + 2000000), bound + 2000000);
        -- Its job is done: the partition bound says the same.
        execute format('alter table %I drop constraint %I', t || '_p0', t || '_id_first_bound');
    end loop;

    -- The foreign key of the partitioned table adopts the old table's (same columns, same
    -- reference): no second validation.
    if not exists (select 1 from pg_constraint
                   where conrelid = 'backend_state'::regclass and contype = 'f') then
        alter table backend_state add constraint backend_state_backend_id_fkey
            foreign key (backend_id) references backend (id);
    end if;
end
$$;
commit;
