-- A failed attempt's task waits before it may be claimed again (export.retry_backoff_secs,
-- doubling with each failure): a fault that fails at once, such as a full disk, no longer
-- spends every attempt in a fraction of a second. NULL: claimable now.
ALTER TABLE export_tasks ADD COLUMN run_after timestamptz;
