-- A failed job's status shows only this id; the log line that reports the failure carries it
-- with the cause (paths, storage codes and SQL messages are for operators, not clients).
ALTER TABLE export_jobs ADD COLUMN error_id uuid;
