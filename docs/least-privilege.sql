-- Least-privilege roles for a plane-db database (see README, "Least-privilege roles").
--
--   plane_migrator  owns the schema and runs the migrations (`plane-db migrate`, or
--                   `plane_db::migrate`); it is used only while upgrading.
--   plane_app       what controllers connect as: reads and writes rows, takes sequence
--                   values, runs the schema's functions; no superuser, no DDL, no CREATE.
--
-- Rename the roles to suit (tests/it/least_privilege.rs applies this file with names of
-- its own); the statements name no database, they act on the one you are connected to.
-- Set passwords separately (`\password plane_app` in psql) or use certificates: this file
-- holds no secret.
--
-- Part 1: as a superuser (or a role with CREATEROLE that owns the database), connected to
-- the plane-db database, once, before the first migration.

create role plane_migrator login nosuperuser nocreatedb nocreaterole noreplication nobypassrls;
create role plane_app login nosuperuser nocreatedb nocreaterole noreplication nobypassrls;

-- Only these two roles may connect; nobody may create temporary tables.
do $$
begin
    execute format('revoke all on database %I from public', current_database());
    execute format('grant connect on database %I to plane_migrator, plane_app',
                   current_database());
end
$$;

-- The migration role owns the schema; nobody else may create in it (Postgres before 15
-- let every role create in `public`).
alter schema public owner to plane_migrator;
revoke all on schema public from public;
grant usage on schema public to plane_app;

-- What the migrations create from now on, the application role may use, and no more:
-- rows of every table (select, insert, update, delete; no truncate, references or
-- trigger), every sequence (usage: nextval for the bigserial/serial ids and the fencing
-- tokens), and every function (execute: plane_write_events(), through which every event is
-- written, and plane_event_wake(), the trigger function that wakes the event listeners).
-- Functions are not executable by every role, as Postgres' default would have it.
alter default privileges for role plane_migrator
    revoke execute on functions from public;
alter default privileges for role plane_migrator in schema public
    grant select, insert, update, delete on tables to plane_app;
alter default privileges for role plane_migrator in schema public
    grant usage on sequences to plane_app;
alter default privileges for role plane_migrator in schema public
    grant execute on functions to plane_app;

-- Nothing else is needed. The application also calls built-in functions that every role
-- may execute: pg_notify and LISTEN (the event bus), set_config('plane.event_wake', ...,
-- true) and current_setting (a custom setting, which any role may set for its own
-- transaction), pg_current_snapshot, pg_snapshot_xmax, pg_visible_in_snapshot,
-- pg_current_xact_id and pg_postmaster_start_time (the event bus reads the table by
-- transaction visibility), and pg_advisory_lock (the migration lock; taken only when
-- migrations are missing).
--
-- Part 2: as plane_migrator, after the first migration (`plane-db migrate`).

-- The application reads the migration history (plane_db::migrate checks it at start-up,
-- without DDL when the schema is up to date) but does not write it.
revoke insert, update, delete on _sqlx_migrations from plane_app;
