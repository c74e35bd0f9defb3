-- `_elements`: the top-level elements to keep ('element' or 'Type.element'); empty keeps all.
ALTER TABLE export_jobs ADD COLUMN elements text[] NOT NULL DEFAULT '{}';
