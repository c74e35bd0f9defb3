-- SMART client assertions seen, so that none is accepted twice (replay protection).
CREATE TABLE auth_assertions (
    client_id  text        NOT NULL,
    jti        text        NOT NULL,
    expires_at timestamptz NOT NULL,
    PRIMARY KEY (client_id, jti)
);

-- The client that started an export; only it sees the job and its files. NULL: no auth.
ALTER TABLE export_jobs ADD COLUMN owner text;
