"""The shared gallery's PostgreSQL schema: the SQLite gallery's tables (speakers, enrollments
with their features, embeddings, subjects, the audit trail), the unknown-voice clusters and the
word templates, plus ``changes``: a counter per kind of change (the clusters' too, so each
node sees the clusters other nodes form), bumped and announced
(NOTIFY streamd_gallery, delivered at commit) by statement triggers in the changing transaction.
"""

from __future__ import annotations

SCHEMA_VERSION = 1
CHANNEL = "streamd_gallery"
LOCK = 0x5374726D  # pg_advisory_xact_lock key: schema set-up and gallery writes, one at a time

TABLES = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS speakers (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    created DOUBLE PRECISION NOT NULL,
    updated DOUBLE PRECISION NOT NULL
);
CREATE TABLE IF NOT EXISTS enrollments (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    speaker_id BIGINT NOT NULL REFERENCES speakers(id) ON DELETE CASCADE,
    features BYTEA NOT NULL,
    dims INTEGER NOT NULL,
    feature_key TEXT NOT NULL,
    seconds DOUBLE PRECISION NOT NULL,
    source TEXT NOT NULL,
    created DOUBLE PRECISION NOT NULL
);
CREATE INDEX IF NOT EXISTS enrollments_by_speaker ON enrollments(speaker_id);
CREATE TABLE IF NOT EXISTS embeddings (
    enrollment_id BIGINT NOT NULL REFERENCES enrollments(id) ON DELETE CASCADE,
    model_sha256 TEXT NOT NULL,
    vector BYTEA NOT NULL,
    PRIMARY KEY (enrollment_id, model_sha256)
);
CREATE TABLE IF NOT EXISTS subjects (
    speaker_id BIGINT PRIMARY KEY REFERENCES speakers(id) ON DELETE CASCADE,
    subject TEXT NOT NULL UNIQUE
);
CREATE TABLE IF NOT EXISTS audit (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    time DOUBLE PRECISION NOT NULL,
    who TEXT NOT NULL,
    action TEXT NOT NULL,
    subject TEXT NOT NULL,
    name TEXT,
    old_name TEXT,
    detail TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_by_subject ON audit(subject);
CREATE TABLE IF NOT EXISTS clusters (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    created DOUBLE PRECISION NOT NULL,
    updated DOUBLE PRECISION NOT NULL,
    heard INTEGER NOT NULL DEFAULT 0,
    seconds DOUBLE PRECISION NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS cluster_members (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    cluster_id BIGINT NOT NULL REFERENCES clusters(id) ON DELETE CASCADE,
    features BYTEA NOT NULL,
    dims INTEGER NOT NULL,
    feature_key TEXT NOT NULL,
    seconds DOUBLE PRECISION NOT NULL,
    peak DOUBLE PRECISION NOT NULL,
    clipped DOUBLE PRECISION NOT NULL,
    rms_dbfs DOUBLE PRECISION NOT NULL,
    created DOUBLE PRECISION NOT NULL
);
CREATE INDEX IF NOT EXISTS cluster_members_by_cluster ON cluster_members(cluster_id);
CREATE TABLE IF NOT EXISTS cluster_embeddings (
    member_id BIGINT NOT NULL REFERENCES cluster_members(id) ON DELETE CASCADE,
    model_sha256 TEXT NOT NULL,
    vector BYTEA NOT NULL,
    PRIMARY KEY (member_id, model_sha256)
);
CREATE TABLE IF NOT EXISTS word_templates (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    vocabulary TEXT NOT NULL,
    digit INTEGER NOT NULL CHECK (digit BETWEEN 0 AND 9),
    input BYTEA NOT NULL,
    model_sha256 TEXT NOT NULL,
    vector BYTEA NOT NULL,
    source TEXT NOT NULL,
    created DOUBLE PRECISION NOT NULL
);
CREATE TABLE IF NOT EXISTS changes (what TEXT PRIMARY KEY, n BIGINT NOT NULL);
INSERT INTO changes VALUES ('speakers', 0), ('words', 0), ('audit', 0), ('clusters', 0) ON CONFLICT DO NOTHING;
"""

TRIGGERS = f"""
CREATE OR REPLACE FUNCTION streamd_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE changes SET n = n + 1 WHERE what = TG_ARGV[0];
    PERFORM pg_notify('{CHANNEL}', TG_ARGV[0]);
    RETURN NULL;
END $$;
""" + "".join(
    f"CREATE OR REPLACE TRIGGER {table}_counted AFTER INSERT OR UPDATE OR DELETE ON {table} "
    f"FOR EACH STATEMENT EXECUTE FUNCTION streamd_changed('{what}');\n"
    for table, what in (("speakers", "speakers"), ("enrollments", "speakers"), ("embeddings", "speakers"),
                        ("word_templates", "words"), ("audit", "audit"), ("clusters", "clusters"),
                        ("cluster_members", "clusters")))
