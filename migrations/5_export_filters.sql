-- `_typeFilter` entries ('Type?query'), `includeAssociatedData`, and what a lenient kick-off
-- ignored (written to the manifest's error file).
ALTER TABLE export_jobs
    ADD COLUMN type_filters    text[]  NOT NULL DEFAULT '{}',
    ADD COLUMN include_history boolean NOT NULL DEFAULT false,
    ADD COLUMN include_deleted boolean NOT NULL DEFAULT false,
    ADD COLUMN notes           text[]  NOT NULL DEFAULT '{}';

-- 'history' tasks list older versions, 'softdeleted' ones the last state of deleted resources.
ALTER TABLE export_tasks DROP CONSTRAINT export_tasks_kind_check;
ALTER TABLE export_tasks ADD CONSTRAINT export_tasks_kind_check
    CHECK (kind IN ('plan', 'export', 'deleted', 'history', 'softdeleted'));
-- Versions share their resource's seq, so history checkpoints need the version too.
ALTER TABLE export_tasks ADD COLUMN checkpoint_version integer NOT NULL DEFAULT 0;

-- Older versions of a type in seq order, for `includeAssociatedData`.
CREATE INDEX resources_history_seq ON resources (resource_type, seq, version_id)
    WHERE NOT is_current;
