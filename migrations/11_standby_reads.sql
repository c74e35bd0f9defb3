-- Reads from a standby: the primary's WAL position once the job's snapshot is complete (the
-- standby must have replayed past it before it serves the job's pages), and what each task
-- read from, for X-Progress.
ALTER TABLE export_jobs ADD COLUMN read_lsn pg_lsn;
CREATE TYPE read_source AS ENUM ('standby', 'primary');
ALTER TABLE export_tasks
    ADD COLUMN read_source read_source,
    ADD COLUMN standby_behind_bytes bigint;
