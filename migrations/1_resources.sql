-- The resource store: every version of every resource, one row each.
--
-- Why one table with an `is_current` flag rather than current + history tables: a version's body
-- is written once and never copied, and "latest version with last_updated <= T" is either the
-- current row or (for the few rows changed after T) one primary-key lookup.
--
-- Types and ids use the "C" collation: byte order is cheap to compare and makes keyset
-- pagination bounds (e.g. '~' sorts after every valid id) mean the same everywhere.
-- One number per resource (not per version), in creation order: export pages through a type by
-- it. Rows are stored roughly in creation order, so reading a type in `seq` order reads the table
-- nearly sequentially; reading it in `id` order (random UUIDs) would touch one page per row.
CREATE SEQUENCE resource_seq;

CREATE TABLE resources (
    resource_type text COLLATE "C" NOT NULL,
    id            text COLLATE "C" NOT NULL,
    version_id    integer     NOT NULL CHECK (version_id > 0),
    -- From resource_seq when the resource is first written; every later version keeps it.
    seq           bigint      NOT NULL,
    -- Server clock, microsecond precision, strictly increasing per resource.
    last_updated  timestamptz NOT NULL,
    is_current    boolean     NOT NULL,
    -- Ids of the patients whose compartment holds this version, computed at write time so that
    -- Patient and Group export select by patient without looking inside the JSON.
    patient_ids   text[]      NOT NULL DEFAULT '{}',
    -- The exact JSON text export emits (id, meta.versionId, meta.lastUpdated inside), stored as
    -- text because export streams it out untouched. NULL marks a delete (a tombstone version).
    body          text,
    PRIMARY KEY (resource_type, id, version_id)
);

-- The primary key also serves "the current version of X". At most one version per resource is
-- current: writers lock the current row, and two first versions collide on the key. (A unique
-- index on current rows would double the cost of loading.)

-- Export's keyset pages: current rows of a type in creation order. New resources append at the
-- right edge, which keeps this index cheap to maintain.
CREATE INDEX resources_current_seq ON resources (resource_type, seq) WHERE is_current;

-- Finds the rows changed after an export's transaction time (they need the history lookup) and
-- serves `_since` exports.
CREATE INDEX resources_current_updated ON resources (resource_type, last_updated) WHERE is_current;

-- Patient and Group export: which current rows belong to these patients.
CREATE INDEX resources_current_patients ON resources USING gin (patient_ids) WHERE is_current;
