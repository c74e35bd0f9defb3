-- `_until` (Bulk Data STU3): the export holds only versions last updated before it. The job's
-- transaction time stays the kick-off's; the snapshot is read just before `_until` when that is
-- earlier.
ALTER TABLE export_jobs ADD COLUMN until timestamptz;
