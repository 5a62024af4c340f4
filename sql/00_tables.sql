-- Raw tables: every committed shard of each Parquet table. ${STORE} is replaced by the store path when the
-- catalog is (re)built. Files are globbed at query time, so new shards show up without a rebuild.
--
-- A shard is committed iff its manifest, _manifests/<stage>/<source>/<shard>.json, exists (written after its
-- data files): a data file <table>/<source>/<stage>-<shard>.parquet whose manifest is missing (a crash between
-- the two, a planted file) is never read. Only the manifests' names are listed, never their contents.
CREATE OR REPLACE MACRO committed_shards() AS TABLE
SELECT regexp_replace(file, '^.*/_manifests/([^/]+)/([^/]+)/([^/]+)\.json$', '\2/\1-\3') AS shard_key
FROM glob('${STORE}/_manifests/*/*/*.json');

-- The committed rows of one table, with the file each row came from. The zero-row _schema.parquet file of
-- every table gives the columns even when nothing is committed yet.
CREATE OR REPLACE MACRO store_table(tbl) AS TABLE
SELECT * FROM read_parquet('${STORE}/' || tbl || '/**/*.parquet', filename = true)
WHERE regexp_extract(filename, '([^/]+/[^/]+)\.parquet$', 1) IN (SELECT shard_key FROM committed_shards());

CREATE OR REPLACE VIEW images_raw AS
SELECT * FROM store_table('images');

CREATE OR REPLACE VIEW texts_raw AS
SELECT * EXCLUDE (filename) FROM store_table('texts');

CREATE OR REPLACE VIEW known_pairs_raw AS
SELECT * EXCLUDE (filename) FROM store_table('known_pairs');

CREATE OR REPLACE VIEW rejects AS
SELECT * EXCLUDE (filename) FROM store_table('rejects');

CREATE OR REPLACE VIEW regions AS
SELECT * EXCLUDE (filename) FROM store_table('regions');

CREATE OR REPLACE VIEW image_tags AS
SELECT * EXCLUDE (filename) FROM store_table('image_tags');

CREATE OR REPLACE VIEW text_embeddings AS
SELECT * EXCLUDE (filename) FROM store_table('text_embeddings');

CREATE OR REPLACE VIEW retrieved_pairs AS
SELECT * EXCLUDE (filename) FROM store_table('retrieved_pairs');

CREATE OR REPLACE VIEW noun_phrases AS
SELECT * EXCLUDE (filename) FROM store_table('noun_phrases');

CREATE OR REPLACE VIEW phrase_links AS
SELECT * EXCLUDE (filename) FROM store_table('phrase_links');

CREATE OR REPLACE VIEW patch_gallery AS
SELECT * EXCLUDE (filename) FROM store_table('patch_gallery');

CREATE OR REPLACE VIEW concepts AS
SELECT * EXCLUDE (filename) FROM store_table('concepts');
