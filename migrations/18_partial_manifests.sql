-- `allowPartialManifests=true` (Bulk Data STU3): the status URL hands out manifest pages of the
-- files already complete while the export runs, and a completed manifest in pages. A page is
-- fixed the first time it is served: each file is published on one page, once, and a page
-- never changes after (new files go on the next page, linked from the one before).
ALTER TABLE export_jobs ADD COLUMN allow_partial_manifests boolean NOT NULL DEFAULT false;

-- The manifest page a committed file was published on; NULL: not yet published.
ALTER TABLE export_parts ADD COLUMN page integer CHECK (page > 0);
CREATE INDEX export_parts_pages ON export_parts (job_id, page) WHERE page IS NOT NULL;
