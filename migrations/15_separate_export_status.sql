-- `Prefer: separate-export-status` (Bulk Data STU3): the kick-off asked that status answers be
-- about the status request itself (200), with the job's own status in `X-Export-Status`. Kept
-- with the job, as every status answer of the job follows it.
ALTER TABLE export_jobs ADD COLUMN separate_status boolean NOT NULL DEFAULT false;
