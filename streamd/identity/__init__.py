"""Identity: what people enrolled and how it is matched: open-set speaker scoring, the gallery
(SQLite), enrollment and its gates, unknown-voice clusters, and the words taught at run time
(vocabularies, stored in the same gallery)."""
