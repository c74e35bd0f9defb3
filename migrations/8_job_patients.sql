-- The patients a Patient or Group export reads (Group members, narrowed by `patient`), stored
-- once per job. Page queries join this table instead of carrying the list: a Group of a million
-- members is neither copied into every page query nor compared element by element with each
-- row's compartments (an index probe per compartment id instead).
CREATE TABLE export_job_patients (
    job_id     uuid NOT NULL REFERENCES export_jobs (id) ON DELETE CASCADE,
    patient_id text COLLATE "C" NOT NULL,
    PRIMARY KEY (job_id, patient_id)
);

ALTER TABLE export_jobs DROP COLUMN patient_ids;
-- The job reads only the patients listed in export_job_patients.
ALTER TABLE export_jobs ADD COLUMN named_patients boolean NOT NULL DEFAULT false;
