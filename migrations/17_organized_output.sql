-- `organizeOutputBy=Patient` (Bulk Data STU3): output in resource blocks, one per patient — a
-- header line, the Patient, then the resources of its compartment.
--
-- A resource's block is its patient: the Patient's own id, or for any other resource the
-- lowest id among the patients whose compartment holds it (`patient_ids` is kept sorted), so a
-- resource in two compartments is written once. This index hands out the current rows in block
-- order, the Patient first (`false` sorts before `true`), then by creation; the rows changed
-- after a job's transaction time take their block from their older version instead (few rows,
-- found through `resources_current_updated`).
CREATE INDEX resources_current_blocks ON resources (
    ((CASE WHEN resource_type = 'Patient' THEN id ELSE patient_ids[1] END) COLLATE "C"),
    (resource_type <> 'Patient'),
    seq)
    WHERE is_current AND cardinality(patient_ids) > 0;

-- Resources in no patient's compartment are written to files of their own type, as without
-- `organizeOutputBy`; this index finds them among the many that are in one.
CREATE INDEX resources_current_unattached ON resources (resource_type, seq)
    WHERE is_current AND cardinality(patient_ids) = 0;

-- The type the output is organized by (only 'Patient'); NULL: files of one type each.
ALTER TABLE export_jobs ADD COLUMN organize_by text;

-- A task that writes the blocks of the patients whose ids are in (block_after, block_last]
-- (NULL: unbounded), and its checkpoint: the last row written, as (block, is not the Patient,
-- seq) in the order of `resources_current_blocks`.
ALTER TYPE task_kind ADD VALUE 'blocks';
ALTER TABLE export_tasks
    ADD COLUMN block_after text COLLATE "C",
    ADD COLUMN block_last text COLLATE "C",
    ADD COLUMN checkpoint_block text COLLATE "C",
    ADD COLUMN checkpoint_after_patient boolean NOT NULL DEFAULT false;

-- The file ends inside a block that goes on in the task's next file (`continuesInFile`).
ALTER TABLE export_parts ADD COLUMN continues boolean NOT NULL DEFAULT false;
