-- Kinds, states and levels become enum types: the database refuses a value the code does not
-- know, and the code maps each type to one Rust enum (a new kind is a compile error wherever it
-- matters, not a string that silently falls through).
CREATE TYPE export_level AS ENUM ('system', 'patient', 'group');
CREATE TYPE job_state AS ENUM ('queued', 'running', 'completed', 'failed', 'cancelled');
CREATE TYPE task_kind AS ENUM ('plan', 'export', 'deleted', 'history', 'softdeleted');
CREATE TYPE task_state AS ENUM ('queued', 'running', 'done', 'failed', 'cancelled');

-- Partial indexes name the old text values; rebuilt below.
DROP INDEX export_jobs_active;
DROP INDEX export_tasks_queued;
DROP INDEX export_tasks_leases;

ALTER TABLE export_jobs
    DROP CONSTRAINT export_jobs_status_check,
    DROP CONSTRAINT export_jobs_level_check,
    ALTER COLUMN status DROP DEFAULT,
    ALTER COLUMN status TYPE job_state USING status::job_state,
    ALTER COLUMN status SET DEFAULT 'queued',
    ALTER COLUMN level TYPE export_level USING level::export_level;

ALTER TABLE export_tasks
    DROP CONSTRAINT export_tasks_kind_check,
    DROP CONSTRAINT export_tasks_status_check,
    ALTER COLUMN kind TYPE task_kind USING kind::task_kind,
    ALTER COLUMN status DROP DEFAULT,
    ALTER COLUMN status TYPE task_state USING status::task_state,
    ALTER COLUMN status SET DEFAULT 'queued';

CREATE INDEX export_jobs_active ON export_jobs (status) WHERE status IN ('queued', 'running');
CREATE INDEX export_tasks_queued ON export_tasks (id) WHERE status = 'queued';
CREATE INDEX export_tasks_leases ON export_tasks (leased_until) WHERE status = 'running';

-- Settings that shape a job's files are fixed at kick-off, so every replica and every retry
-- cuts the same files whatever its own configuration says. `created_at` (the kick-off instant)
-- is also the "now" of `ap` date filters, for the same reason.
ALTER TABLE export_jobs
    ADD COLUMN part_size      integer NOT NULL DEFAULT 5000 CHECK (part_size > 0),
    ADD COLUMN part_max_bytes bigint  NOT NULL DEFAULT 268435456 CHECK (part_max_bytes > 0),
    ADD COLUMN range_size     bigint  NOT NULL DEFAULT 20000 CHECK (range_size > 0);

-- The write transactions of this database that held a write lock on `resources` at kick-off,
-- by virtual transaction id. Every writer takes that lock before it reads the clock, so these
-- are all that could still commit a version stamped at or before the transaction time; the
-- plan waits until none of them holds the lock. (The transaction ids of a cluster-wide
-- snapshot, used before, listed other databases' transactions and missed the newest writers.)
ALTER TABLE export_jobs DROP COLUMN in_flight;
ALTER TABLE export_jobs ADD COLUMN writers text[] NOT NULL DEFAULT '{}';

-- What a planning task is waiting for, for the status URL's X-Progress.
ALTER TABLE export_tasks ADD COLUMN waiting_writers integer NOT NULL DEFAULT 0;
