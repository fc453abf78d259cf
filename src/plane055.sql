-- Converting a database that Plane 0.5.5 migrated into plane-db's schema, in place.
--
-- src/plane055.rs runs these steps one at a time, in the order it names them, all in ONE
-- transaction taken under the migration lock: a failure at any step rolls everything back,
-- and Plane's database is left as it was. Each step is a single statement (a `do` block
-- counts as one), so that it can take bind parameters and report how many rows it wrote.
-- Between "set aside" and "copy controllers" the Rust side creates plane-db's schema (the
-- migrations up to the conversion's target version) and records them in
-- _sqlx_migrations in place of Plane's.
--
-- Table by table (Plane 0.5.5 -> plane-db):
--   controller, drone, backend_state, backend_key, acme_txt_entries: the same columns;
--       copied as they are.
--   node: the same columns. Plane's unique (cluster, name) index lets NULLs differ, so a
--       cross-cluster node (an ACME DNS server, cluster null) got a new row at each
--       connection; plane-db's counts NULLs equal. Only the newest row of each such name is
--       kept, and an ACME lease held by an older one moves to it.
--   backend: last_status_number, nullable in Plane (rows from before its migration
--       20240625170232 have none), is derived from last_status, which is also written in
--       plane-db's spelling (Plane wrote capitalised statuses before 20240206210023).
--   backend_action: Plane's action column holds the whole BackendActionMessage
--       ({action_id, backend_id, drone_id, action}); plane-db's holds its BackendAction (the
--       message's action), the rest being the row's columns. backend_id, nullable in Plane
--       though it always set it, is taken from the message where it is missing.
--   token: Plane keeps each bearer token in clear (column token); plane-db keeps its SHA-256
--       (token_digest), which is computed here, so every token Plane issued still routes.
--   event: ids, kinds and payloads are kept (the payloads have the same JSON shapes); xid
--       (the writing transaction) is this conversion's. Plane wrote node_connection events
--       without a key, plane-db keys them by the node id: the key is derived from the
--       payload's node_id.
-- Sequences continue above Plane's: serial ids from the old sequences, and fencing tokens
-- (Plane's were the acquisition time in epoch milliseconds) from the current time.
-- Plane's tables are dropped at the end: a kept copy of its token table would hold every
-- live bearer token in clear, which the digests exist to prevent.

-- step: lock Plane's tables
-- Every Plane transaction still writing finishes before anything is read, and none starts
-- after.
lock table controller, node, drone, backend, backend_state, backend_action, backend_key,
    token, event, acme_txt_entries in access exclusive mode;

-- step: set aside
-- Renames Plane's tables to plane055_<name>, with their indexes (primary keys included) and
-- the sequences of their serial columns, whose names plane-db's schema reuses.
do $$
declare
    plane_table text;
    object record;
begin
    foreach plane_table in array array['controller', 'node', 'drone', 'backend',
        'backend_state', 'backend_action', 'backend_key', 'token', 'event', 'acme_txt_entries']
    loop
        for object in
            select n.nspname as schema_name, c.relname as name, c.relkind as kind
            from pg_class c
            join pg_namespace n on n.oid = c.relnamespace
            where c.relkind in ('i', 'S')
              and c.oid in (
                  select i.indexrelid from pg_index i where i.indrelid = plane_table::regclass
                  union
                  select d.objid from pg_depend d
                  where d.classid = 'pg_class'::regclass
                    and d.refclassid = 'pg_class'::regclass
                    and d.refobjid = plane_table::regclass
                    and d.deptype in ('a', 'i')
              )
        loop
            execute format('alter %s %I.%I rename to %I',
                case object.kind when 'i' then 'index' else 'sequence' end,
                object.schema_name, object.name, 'plane055_' || object.name);
        end loop;
        execute format('alter table %I rename to %I', plane_table, 'plane055_' || plane_table);
    end loop;
end
$$;

-- step: find unknown statuses
-- $1: plane-db's status names. Backends whose status matches none (case, '-' and '_' aside).
select b.id, b.last_status
from plane055_backend b
where not exists (
    select 1 from unnest($1::text[]) as s(name)
    where translate(lower(b.last_status), '-_', '') = translate(s.name, '-_', '')
)
order by b.id;

-- step: find actions without a backend
select a.id
from plane055_backend_action a
where not exists (
    select 1 from plane055_backend b
    where b.id = coalesce(a.backend_id, a.action ->> 'backend_id')
)
order by a.id;

-- step: count Plane's rows
-- What each copy must write, to check that nothing was left behind.
select
    (select count(*) from plane055_controller) as controllers,
    (select count(*) from plane055_node) as nodes,
    (select count(*) from plane055_node where cluster is not null)
        + (select count(distinct name) from plane055_node where cluster is null)
        as nodes_kept,
    (select count(*) from plane055_drone) as drones,
    (select count(*) from plane055_backend) as backends,
    (select count(*) from plane055_backend_state) as backend_states,
    (select count(*) from plane055_backend_key) as backend_keys,
    (select count(*) from plane055_backend_action) as backend_actions,
    (select count(*) from plane055_token) as tokens,
    (select count(*) from plane055_event) as events,
    (select count(*) from plane055_acme_txt_entries) as acme_txt_entries;

-- step: copy controllers
insert into controller (id, first_seen, last_heartbeat, is_online, plane_version, plane_hash,
                        ip)
select id, first_seen, last_heartbeat, is_online, plane_version, plane_hash, ip
from plane055_controller;

-- step: copy nodes
insert into node (id, kind, name, cluster, plane_version, plane_hash, controller, ip,
                  last_connection_start_time)
select n.id, n.kind, n.name, n.cluster, n.plane_version, n.plane_hash, n.controller, n.ip,
       n.last_connection_start_time
from plane055_node n
where n.cluster is not null
   or n.id = (select max(o.id) from plane055_node o where o.cluster is null and o.name = n.name);

-- step: copy drones
insert into drone (id, ready, draining, last_heartbeat, last_local_time, pool)
select id, ready, draining, last_heartbeat, last_local_time, pool
from plane055_drone;

-- step: copy backends
-- $1, $2: plane-db's status names and their numbers (BackendStatus::ALL and as_int).
insert into backend (id, cluster, last_status, last_status_number, last_status_time, state,
                     cluster_address, drone_id, expiration_time, allowed_idle_seconds,
                     last_keepalive, static_token, subdomain)
select b.id, b.cluster, s.name, s.number, b.last_status_time, b.state, b.cluster_address,
       b.drone_id, b.expiration_time, b.allowed_idle_seconds, b.last_keepalive,
       b.static_token, b.subdomain
from plane055_backend b
join unnest($1::text[], $2::integer[]) as s(name, number)
  on translate(lower(b.last_status), '-_', '') = translate(s.name, '-_', '');

-- step: copy backend states
insert into backend_state (id, backend_id, state, created_at)
select id, backend_id, state, created_at
from plane055_backend_state;

-- step: copy keys
insert into backend_key (id, namespace, key_name, tag, expires_at, fencing_token, allow_renew)
select id, namespace, key_name, tag, expires_at, fencing_token, allow_renew
from plane055_backend_key;

-- step: continue fencing tokens
-- Plane's fencing token was the acquisition time in epoch milliseconds (its database clock).
-- Every later acquisition must get a larger one, also for keys whose row is gone, so the
-- sequence continues above the current time (read now, after the lock: every Plane
-- acquisition committed before it) and above every token held.
select setval('backend_key_fencing_token_seq', greatest(
    (select max(fencing_token) from backend_key),
    (extract(epoch from clock_timestamp()) * 1000)::bigint,
    1
));

-- step: copy actions
-- A row whose JSON is not a message (Plane never wrote one) is kept as it is.
insert into backend_action (id, backend_id, drone_id, action, created_at, acked_at)
select id, coalesce(backend_id, action ->> 'backend_id'), drone_id,
       case when jsonb_typeof(action -> 'action') = 'object' then action -> 'action'
            else action
       end,
       created_at, acked_at
from plane055_backend_action;

-- step: copy tokens
-- BearerToken::digest: SHA-256 of the token's UTF-8 bytes.
insert into token (token_digest, backend_id, expiration_time, username, auth, secret_token)
select sha256(convert_to(token, 'UTF8')), backend_id, expiration_time, username, auth,
       secret_token
from plane055_token;

-- step: copy events
-- The transaction set plane.event_wake to 'deferred', so the wake trigger stays silent
-- (nothing listens yet). A bus started later reads only events committed after its start.
insert into event (id, kind, key, created_at, data)
select id, kind,
       coalesce(key, case when kind = 'node_connection' then data ->> 'node_id' end),
       created_at, data
from plane055_event;

-- step: copy ACME TXT records
insert into acme_txt_entries (cluster, leased_at, leased_by, txt_value)
select a.cluster, a.leased_at,
       case when n.cluster is null
            then (select max(o.id) from plane055_node o
                  where o.cluster is null and o.name = n.name)
            else a.leased_by
       end,
       a.txt_value
from plane055_acme_txt_entries a
join plane055_node n on n.id = a.leased_by;

-- step: continue ids
-- New nodes, states and events get ids above every id Plane handed out (its sequences may
-- be past the largest id left in the table).
select
    setval(pg_get_serial_sequence('node', 'id'), greatest(
        pg_sequence_last_value(pg_get_serial_sequence('plane055_node', 'id')::regclass),
        (select max(id) from node), 1)),
    setval(pg_get_serial_sequence('backend_state', 'id'), greatest(
        pg_sequence_last_value(pg_get_serial_sequence('plane055_backend_state', 'id')::regclass),
        (select max(id) from backend_state), 1)),
    setval(pg_get_serial_sequence('event', 'id'), greatest(
        pg_sequence_last_value(pg_get_serial_sequence('plane055_event', 'id')::regclass),
        (select max(id) from event), 1));

-- step: drop Plane's tables
-- Without cascade: an object of the operator's that depends on one of them (a view, say)
-- stops the conversion here, and everything is rolled back.
drop table plane055_token, plane055_backend_key, plane055_backend_action,
    plane055_backend_state, plane055_event, plane055_acme_txt_entries, plane055_backend,
    plane055_drone, plane055_node, plane055_controller;
