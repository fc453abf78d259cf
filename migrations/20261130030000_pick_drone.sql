-- How a drone is picked for a new backend, defined once: `DroneDatabase::pick_for_spawn`
-- calls it, and so does `connect`'s spawn statement for each new backend (the pick and the
-- writes in one round trip).
--
-- Among a random sample of at most `sample_size` eligible drones (in the cluster and pool,
-- ready, not draining, heard from within `drone_timeout_secs`, held by a controller that is
-- online and heard from within `controller_timeout_secs`), the one with the fewest backends
-- below `terminated_status` wins; ties are broken at random. No row if no drone qualifies.
--
-- Additive: older builds neither call it nor notice it.
create function plane_pick_drone(
    cluster text,
    pool text,
    drone_timeout_secs double precision,
    controller_timeout_secs double precision,
    sample_size bigint,
    terminated_status integer
)
returns table (id integer, name text) language sql volatile as $$
    -- Positional references: in a SQL function a column named like an argument would win.
    with sample as (
        select d.id, n.name
        from drone d
        join node n on n.id = d.id
        join controller c on c.id = n.controller
        where n.cluster = $1
          and d.pool = $2
          and d.ready
          and not d.draining
          and d.last_heartbeat > now() - make_interval(secs => $3)
          and c.is_online
          and c.last_heartbeat > now() - make_interval(secs => $4)
        order by random()
        limit $5
    )
    select s.id, s.name
    from sample s
    order by (
        select count(*) from backend b
        where b.drone_id = s.id and b.last_status_number < $6
    ), random()
    limit 1
$$;

comment on function plane_pick_drone(text, text, double precision, double precision, bigint, integer) is 'Picks a drone for a new backend: the least loaded of a random sample of eligible drones (see the migration that creates it). Called by pick_for_spawn and by connect''s spawn statement.';
