-- Secrets every replica shares, made once by the first server to need them: `file-urls` signs
-- the short-lived file links of export.output_urls = "signed", so that a link one replica wrote
-- into a manifest opens on any other.
CREATE TABLE server_secrets (
    name   text  PRIMARY KEY,
    secret bytea NOT NULL CHECK (length(secret) >= 32)
);
