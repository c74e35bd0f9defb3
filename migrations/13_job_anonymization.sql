-- De-identified exports (`_anonymizationConfig`): the configuration as it was read at
-- kick-off (so every worker and every retry applies the same rules, whatever happens to the
-- stored file later), its name for the manifest, and the job's secret seed (the keys a
-- configuration leaves empty and the random draws of `encrypt` and `perturb` come from it, so
-- a retried part is the same bytes while different jobs differ).
ALTER TABLE export_jobs
    ADD COLUMN anonymization_name text,
    ADD COLUMN anonymization_config text,
    ADD COLUMN anonymization_seed bytea;
