-- 'deleted' tasks list the resources deleted in (_since, transaction time] of an export.
ALTER TABLE export_tasks DROP CONSTRAINT export_tasks_kind_check;
ALTER TABLE export_tasks ADD CONSTRAINT export_tasks_kind_check
    CHECK (kind IN ('plan', 'export', 'deleted'));
