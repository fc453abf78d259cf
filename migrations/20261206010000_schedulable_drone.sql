-- The drones a new backend may be scheduled on, written once: `pick_for_spawn` and
-- `connect`'s lone and batch spawn statements all pick from this view (each adds the
-- heartbeat deadlines, which come from the configuration, and the sample and load order).
-- A plain view is inlined into each statement by the planner: no function call per pick
-- (a SQL function for the pick halved the pick rate and its row estimate made Postgres
-- JIT-compile the spawn statement), the same plans as the conditions written out.
--
-- Additive: older builds keep their own copies of these conditions.
create view plane_schedulable_drone as
select
    d.id,
    n.name,
    n.cluster,
    d.pool,
    d.last_heartbeat as drone_heartbeat,
    c.last_heartbeat as controller_heartbeat
from drone d
join node n on n.id = d.id
join controller c on c.id = n.controller
where d.ready
  and not d.draining
  and c.is_online;

comment on view plane_schedulable_drone is 'Drones a new backend may be scheduled on: ready, not draining, held by an online controller. The pick adds the heartbeat deadlines from its configuration (drone_heartbeat, controller_heartbeat) and samples by load.';
