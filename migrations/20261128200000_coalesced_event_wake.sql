-- Coalesced wake-ups. Postgres serialises the commits of every transaction that issued a
-- NOTIFY (one lock on its notification queue, held through the commit), so a NOTIFY in
-- every writer's transaction makes concurrent writers queue behind each other.
--
-- plane-db's own writers (update_state, connect) now mark their transaction with
-- `set_config('plane.event_wake', 'deferred', true)`. For such a transaction the trigger stays
-- silent; after the commit the writing process wakes its own event bus directly and sends one
-- NOTIFY plane_events for however many commits happened meanwhile, outside any writer's
-- transaction (its payload only names the sending process, so that its own bus can ignore
-- it). Every other insert into event (events::emit in a caller's own transaction, older
-- versions of the crate, manual SQL) still notifies from the trigger as before, with an empty
-- payload. The wake-up never carries data: readers take events from the table, and poll it in
-- case a wake-up is lost, so this changes latency only, never what is delivered.
create or replace function plane_event_wake() returns trigger language plpgsql as $$
begin
    if current_setting('plane.event_wake', true) is distinct from 'deferred' then
        perform pg_notify('plane_events', '');
    end if;
    return null;
end;
$$;

comment on function plane_event_wake() is 'Wakes event listeners (payload-free NOTIFY plane_events) unless the inserting transaction set plane.event_wake = deferred, meaning its process sends a coalesced NOTIFY after the commit.';
