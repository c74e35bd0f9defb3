-- Patient and Group export page through a type in `seq` order and test each row's
-- `patient_ids` (one primary-key probe per patient into `export_job_patients`); no query reads
-- this index. Keeping it cost every write a GIN update: a quarter of `load`'s time.
DROP INDEX IF EXISTS resources_current_patients;
