-- A job's patients are written in the kick-off's transaction, before the admission lock is
-- taken (copying a million must not hold other kick-offs up), and deleted with the job by the
-- code that deletes jobs. The foreign key went: Postgres checks one per inserted row, which
-- cost seconds for a Group of a million members.
ALTER TABLE export_job_patients DROP CONSTRAINT export_job_patients_job_id_fkey;
