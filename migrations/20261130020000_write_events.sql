-- The one way plane-db writes events. Every statement of the crate that reports a change
-- passes its events here (parallel arrays: kind, key, payload), in the same statement as the
-- change, so an event exists exactly when its change committed.
--
-- `wake` is what the transaction's `plane.event_wake` becomes before the rows go in:
-- 'deferred' when the writing process will send one coalesced NOTIFY after its commit (the
-- wake trigger then stays silent, and the transaction never takes Postgres's commit-time
-- notification lock), 'notify' when the trigger should wake listeners itself (a caller's own
-- transaction, whose commit the crate does not see). Setting it here rather than in each
-- statement means no writer can insert an event and forget the wake-up.
--
-- Returns the new events' ids in the order given. Additive: older builds neither call it
-- nor notice it.
create function plane_write_events(kinds text[], keys text[], payloads jsonb[], wake text)
returns bigint[] language plpgsql as $$
declare
    ids bigint[];
begin
    perform set_config('plane.event_wake', wake, true);
    with inserted as (
        insert into event (kind, key, data)
        select e.kind, e.key, e.data
        from unnest(kinds, keys, payloads) with ordinality as e(kind, key, data, n)
        order by e.n
        returning id
    )
    select coalesce(array_agg(id order by id), '{}') into ids from inserted;
    return ids;
end;
$$;

comment on function plane_write_events(text[], text[], jsonb[], text) is 'The one path by which plane-db writes events: inserts them (kind, key, payload) after setting plane.event_wake to wake (deferred: the writer sends a coalesced NOTIFY after its commit; notify: the wake trigger notifies). Returns the ids in order.';
