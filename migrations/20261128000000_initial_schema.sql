-- The plane-db schema. Never edit a committed migration: add a new one.
--
-- Status numbers (backend.last_status_number) come from BackendStatus::as_int in the crate:
-- scheduled 10, loading 20, starting 30, waiting 40, ready 50, terminating 60,
-- hard-terminating 65, terminated 70. Queries bind them from Rust; indexes are composite
-- (not partial) so that a bound status range can use them.

create table controller (
    id text primary key,
    first_seen timestamptz not null default now(),
    last_heartbeat timestamptz not null,
    is_online boolean not null,
    plane_version text not null,
    plane_hash text not null,
    ip inet
);

comment on table controller is 'Self-reported information about controllers (the processes that embed plane-db).';
comment on column controller.id is 'The controller name (co-...).';
comment on column controller.first_seen is 'The first time the controller came online.';
comment on column controller.last_heartbeat is 'The last time the controller sent a heartbeat.';
comment on column controller.is_online is 'Whether the controller says it is online; a controller that dies suddenly leaves this true, so readers also check last_heartbeat.';
comment on column controller.plane_version is 'The version of the software running on the controller.';
comment on column controller.plane_hash is 'The git hash of the software running on the controller.';
comment on column controller.ip is 'The last-seen IP of the controller, as seen from the Postgres server.';

create table node (
    id serial primary key,
    kind text not null check (kind in ('Proxy', 'Drone', 'AcmeDnsServer')),
    name text not null check (length(name) between 1 and 45),
    cluster text,
    plane_version text not null,
    plane_hash text not null,
    controller text references controller (id),
    ip inet not null,
    last_connection_start_time timestamptz,
    constraint node_cluster_name_key unique nulls not distinct (cluster, name)
);

comment on table node is 'Nodes (drones, proxies, ACME DNS servers) that have connected to a controller.';
comment on column node.id is 'The node id (NodeId); a drone shares it with its drone row.';
comment on column node.kind is 'The kind of node: Proxy, Drone or AcmeDnsServer (NodeKind).';
comment on column node.name is 'The name the node reports (dr-..., px-..., ns-...), unique within a cluster.';
comment on column node.cluster is 'The cluster the node belongs to; null for cross-cluster nodes (ACME DNS servers).';
comment on column node.plane_version is 'The version of the software running on the node.';
comment on column node.plane_hash is 'The git hash of the software running on the node.';
comment on column node.controller is 'The controller the node is connected to; null while it is disconnected.';
comment on column node.ip is 'The last-seen IP of the node, as seen by its controller.';
comment on column node.last_connection_start_time is 'When the current connection to a controller started; a stale connection may only mark the node offline if this still matches.';

create table drone (
    id integer primary key references node (id),
    ready boolean not null,
    draining boolean not null default false,
    last_heartbeat timestamptz,
    last_local_time timestamptz,
    pool text not null default ''
);

comment on table drone is 'Drones: the hosts that run session backends; the scheduling inputs.';
comment on column drone.id is 'The node id of the drone (node.id).';
comment on column drone.ready is 'Whether the drone is ready to accept backends.';
comment on column drone.draining is 'Whether the drone is draining; the scheduler never picks a draining drone.';
comment on column drone.last_heartbeat is 'The last time the drone sent a heartbeat (database clock).';
comment on column drone.last_local_time is 'The drone''s own clock at its last heartbeat.';
comment on column drone.pool is 'The drone pool the drone belongs to; the empty string is the default pool.';

create table backend (
    id text primary key,
    cluster text not null,
    last_status text not null,
    last_status_number integer not null,
    last_status_time timestamptz not null,
    state jsonb not null,
    cluster_address text,
    drone_id integer not null references drone (id),
    expiration_time timestamptz,
    allowed_idle_seconds integer,
    last_keepalive timestamptz not null,
    static_token text,
    subdomain text
);

comment on table backend is 'Session backends; a row is created when a backend is scheduled and deleted by cleanup long after it terminated.';
comment on column backend.id is 'The backend name (ba-...).';
comment on column backend.cluster is 'The cluster the backend runs in.';
comment on column backend.last_status is 'The current status (BackendStatus, e.g. ready).';
comment on column backend.last_status_number is 'BackendStatus::as_int of last_status; updates only move it forward.';
comment on column backend.last_status_time is 'When last_status was set (database clock).';
comment on column backend.state is 'The current BackendState as JSON.';
comment on column backend.cluster_address is 'The address (IP:PORT) of the backend inside the cluster, once known.';
comment on column backend.drone_id is 'The drone the backend was scheduled on.';
comment on column backend.expiration_time is 'A hard deadline after which the backend is a termination candidate; null for no limit.';
comment on column backend.allowed_idle_seconds is 'How long the backend may go without a keepalive before it is a termination candidate; null for no limit.';
comment on column backend.last_keepalive is 'The last time a proxy reported a connection to the backend.';
comment on column backend.static_token is 'The static bearer token (s....) of a backend spawned with one; null otherwise.';
comment on column backend.subdomain is 'The subdomain the backend is served on, if any.';

-- Alive backends of a drone (list, termination candidates, drone load) and the terminated
-- backends that cleanup looks for: both are ranges on a composite index, so the work stays
-- proportional to the rows returned, not to the history.
create index backend_drone_status_idx on backend (drone_id, last_status_number);
create index backend_status_time_idx on backend (last_status_number, last_status_time);
create unique index backend_static_token_idx on backend (static_token) where static_token is not null;

create table backend_state (
    id bigserial primary key,
    backend_id text not null references backend (id),
    state jsonb not null,
    created_at timestamptz not null default now()
);

comment on table backend_state is 'The history of every backend''s states, appended on each accepted transition.';
comment on column backend_state.id is 'Row id; within one backend it follows the order of the transitions.';
comment on column backend_state.backend_id is 'The backend the state belongs to.';
comment on column backend_state.state is 'The BackendState as JSON.';
comment on column backend_state.created_at is 'When the transition was accepted (database clock).';

create index backend_state_backend_idx on backend_state (backend_id, id);

create sequence backend_key_fencing_token_seq as bigint;

comment on sequence backend_key_fencing_token_seq is 'Source of fencing tokens: every acquisition of a key takes a new, larger value.';

create table backend_key (
    id text primary key references backend (id),
    namespace text not null,
    key_name text not null,
    tag text not null,
    expires_at timestamptz not null,
    fencing_token bigint not null,
    allow_renew boolean not null default true,
    constraint backend_key_namespace_name_key unique (namespace, key_name)
);

comment on table backend_key is 'Keys held by live backends: at most one backend holds a (namespace, key_name) at a time.';
comment on column backend_key.id is 'The backend holding the key.';
comment on column backend_key.namespace is 'The namespace of the key (empty string by default).';
comment on column backend_key.key_name is 'The name of the key, unique within its namespace.';
comment on column backend_key.tag is 'A connect request for the key only reaches the holder if its tag matches this one.';
comment on column backend_key.expires_at is 'When the lease on the key runs out unless renewed; an expired key may be taken over.';
comment on column backend_key.fencing_token is 'Increases every time the key is acquired, stays the same across renewals.';
comment on column backend_key.allow_renew is 'If false, the key may not be renewed, which forces the backend to terminate.';

create index backend_key_expires_idx on backend_key (expires_at);

create table backend_action (
    id text primary key,
    backend_id text not null references backend (id),
    drone_id integer not null references drone (id),
    action jsonb not null,
    created_at timestamptz not null default now(),
    acked_at timestamptz
);

comment on table backend_action is 'Actions queued for drones (spawn, terminate), kept until acknowledged and then until cleanup.';
comment on column backend_action.id is 'The action name (ak-...).';
comment on column backend_action.backend_id is 'The backend the action applies to.';
comment on column backend_action.drone_id is 'The drone that must carry out the action (denormalised from backend for the pending-actions index).';
comment on column backend_action.action is 'The BackendAction as JSON.';
comment on column backend_action.created_at is 'When the action was queued.';
comment on column backend_action.acked_at is 'When the drone acknowledged the action; null until then, and unacknowledged actions are sent again.';

create index backend_action_pending_idx on backend_action (drone_id, created_at) where acked_at is null;
create index backend_action_backend_idx on backend_action (backend_id);

create table token (
    token_digest bytea primary key,
    backend_id text not null references backend (id),
    expiration_time timestamptz not null,
    username text,
    auth jsonb not null,
    secret_token text not null
);

comment on table token is 'Bearer tokens that route a client to a backend. Only a SHA-256 digest of each token is stored, so a dump of this table cannot be used to connect.';
comment on column token.token_digest is 'SHA-256 of the bearer token.';
comment on column token.backend_id is 'The backend the token routes to.';
comment on column token.expiration_time is 'After this time the token no longer routes and may be deleted.';
comment on column token.username is 'The user the token was issued to, passed to the backend.';
comment on column token.auth is 'Arbitrary JSON passed to the backend with each routed request.';
comment on column token.secret_token is 'A second secret handed to the backend with each routed request.';

-- Without this index every deleted backend costs a scan of the token table (foreign key check).
create index token_backend_idx on token (backend_id);
create index token_expiration_idx on token (expiration_time);

create table event (
    id bigserial primary key,
    kind text not null check (length(kind) > 0),
    key text,
    created_at timestamptz not null default now(),
    data jsonb not null,
    xid xid8 not null default pg_current_xact_id()
);

comment on table event is 'Persisted events, written in the transaction of the change they report; the event bus reads new rows from here.';
comment on column event.id is 'Event id. Taken from a sequence at insert time, so ids are NOT in commit order.';
comment on column event.kind is 'The kind of event (NotificationPayload::kind).';
comment on column event.key is 'An optional key (e.g. a backend or drone id); with kind it forms the subject subscriptions filter on.';
comment on column event.created_at is 'When the event was written (database clock).';
comment on column event.data is 'The event payload as JSON.';
comment on column event.xid is 'The writing transaction; the bus compares it with snapshots to read exactly the rows committed since its last read.';

create index event_xid_idx on event (xid);
create index event_created_at_idx on event (created_at);

-- Every persisted event wakes the listeners. The payload is empty: the table is the truth,
-- and Postgres folds identical notifications of one transaction into one.
create function plane_event_wake() returns trigger language plpgsql as $$
begin
    perform pg_notify('plane_events', '');
    return null;
end;
$$;

create trigger event_wake after insert on event for each row execute function plane_event_wake();

create table acme_txt_entries (
    cluster text primary key,
    leased_at timestamptz not null default now(),
    leased_by integer not null references node (id),
    txt_value text
);

comment on table acme_txt_entries is 'ACME DNS-01 TXT values per cluster; doubles as a lease so that one proxy at a time runs a challenge.';
comment on column acme_txt_entries.cluster is 'The cluster the TXT value is for.';
comment on column acme_txt_entries.leased_at is 'When the lease was taken.';
comment on column acme_txt_entries.leased_by is 'The proxy node holding the lease.';
comment on column acme_txt_entries.txt_value is 'The TXT value to serve, if set.';
