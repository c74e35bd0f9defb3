-- The export job queue. A job is one $export request; its tasks are the units workers claim.
CREATE TABLE export_jobs (
    id               uuid        PRIMARY KEY,
    -- queued → running → completed | failed; cancelled when the client deletes it.
    status           text        NOT NULL DEFAULT 'queued'
                     CHECK (status IN ('queued', 'running', 'completed', 'failed', 'cancelled')),
    level            text        NOT NULL CHECK (level IN ('system', 'patient', 'group')),
    -- The kick-off URL, echoed as the manifest's `request`.
    request_url      text        NOT NULL,
    -- The snapshot instant: kick-off time, or `_till`.
    transaction_time timestamptz NOT NULL,
    since            timestamptz,
    -- Types to export; empty means every type that has data.
    types            text[]      NOT NULL,
    -- The patients a Patient or Group export reads: Group members (nested Groups resolved at
    -- kick-off), narrowed by the `patient` parameter. NULL: every patient.
    patient_ids      text[],
    -- Group export: the Group resources walked, which are not exported themselves.
    excluded_groups  text[]      NOT NULL DEFAULT '{}',
    container        text        NOT NULL,
    -- The container was made for this export alone (deleted with it).
    own_container    boolean     NOT NULL,
    folder           text        NOT NULL,
    -- Write transactions in flight at kick-off: planning waits for them so that every version
    -- with last_updated <= transaction_time is visible before anything is read.
    in_flight        xid8[]      NOT NULL DEFAULT '{}',
    error            text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    finished_at      timestamptz,
    -- Completed/failed: when the job and its files go away. Cancelled: when the files are
    -- swept once more (a worker fenced out mid-write may still have renamed a part).
    expires_at       timestamptz
);

CREATE INDEX export_jobs_active ON export_jobs (status) WHERE status IN ('queued', 'running');
CREATE INDEX export_jobs_expiring ON export_jobs (expires_at) WHERE expires_at IS NOT NULL;

CREATE TABLE export_tasks (
    id             bigserial   PRIMARY KEY,
    job_id         uuid        NOT NULL REFERENCES export_jobs (id) ON DELETE CASCADE,
    -- 'plan' splits a job into 'export' tasks (one per type, or per seq range of a large type).
    kind           text        NOT NULL CHECK (kind IN ('plan', 'export')),
    resource_type  text COLLATE "C",
    -- The resources with seq in (range_start, range_end].
    range_start    bigint      NOT NULL DEFAULT 0,
    range_end      bigint      NOT NULL DEFAULT 0,
    status         text        NOT NULL DEFAULT 'queued'
                   CHECK (status IN ('queued', 'running', 'done', 'failed', 'cancelled')),
    -- Fencing token: bumped by every claim. Each write of a worker names the attempt it holds;
    -- a write that matches no row means the lease was lost and the worker must stop.
    attempt        integer     NOT NULL DEFAULT 0,
    -- Leases that ran out or attempts that errored; the job fails at export.max_attempts.
    failures       integer     NOT NULL DEFAULT 0,
    leased_until   timestamptz,
    worker         text,
    -- Checkpoint: the seq of the last resource in a committed part, and how many parts.
    checkpoint_seq bigint      NOT NULL DEFAULT 0,
    parts_done     integer     NOT NULL DEFAULT 0,
    resources_done bigint      NOT NULL DEFAULT 0,
    estimate       bigint      NOT NULL DEFAULT 0,
    last_error     text,
    updated_at     timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX export_tasks_queued ON export_tasks (id) WHERE status = 'queued';
CREATE INDEX export_tasks_leases ON export_tasks (leased_until) WHERE status = 'running';
CREATE INDEX export_tasks_job ON export_tasks (job_id);

-- One row per output file. The number is reserved before the file is written and kept by the
-- (task, seq) that reserved it, so a retried task rewrites the same file names: numbers run
-- 1, 2, 3 … per type without gaps or duplicates however tasks interleave or crash.
CREATE TABLE export_parts (
    job_id        uuid    NOT NULL REFERENCES export_jobs (id) ON DELETE CASCADE,
    resource_type text COLLATE "C" NOT NULL,
    part_no       integer NOT NULL,
    task_id       bigint  NOT NULL,
    task_seq      integer NOT NULL,
    -- NULL until the file is committed.
    resources     integer,
    bytes         bigint,
    PRIMARY KEY (job_id, resource_type, part_no),
    UNIQUE (task_id, task_seq)
);
