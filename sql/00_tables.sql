-- Raw tables: every committed shard file of each Parquet table. ${STORE} is replaced by the store path
-- when the catalog is (re)built. Files are globbed at query time, so new shards show up without a rebuild.
CREATE OR REPLACE VIEW images_raw AS
SELECT * FROM read_parquet('${STORE}/images/**/*.parquet', filename = true);

CREATE OR REPLACE VIEW texts_raw AS
SELECT * FROM read_parquet('${STORE}/texts/**/*.parquet');

CREATE OR REPLACE VIEW known_pairs_raw AS
SELECT * FROM read_parquet('${STORE}/known_pairs/**/*.parquet');

CREATE OR REPLACE VIEW rejects AS
SELECT * FROM read_parquet('${STORE}/rejects/**/*.parquet');

CREATE OR REPLACE VIEW regions AS
SELECT * FROM read_parquet('${STORE}/regions/**/*.parquet');

CREATE OR REPLACE VIEW image_tags AS
SELECT * FROM read_parquet('${STORE}/image_tags/**/*.parquet');

CREATE OR REPLACE VIEW text_embeddings AS
SELECT * FROM read_parquet('${STORE}/text_embeddings/**/*.parquet');

CREATE OR REPLACE VIEW retrieved_pairs AS
SELECT * FROM read_parquet('${STORE}/retrieved_pairs/**/*.parquet');

CREATE OR REPLACE VIEW noun_phrases AS
SELECT * FROM read_parquet('${STORE}/noun_phrases/**/*.parquet');

CREATE OR REPLACE VIEW phrase_links AS
SELECT * FROM read_parquet('${STORE}/phrase_links/**/*.parquet');

CREATE OR REPLACE VIEW patch_gallery AS
SELECT * FROM read_parquet('${STORE}/patch_gallery/**/*.parquet');

CREATE OR REPLACE VIEW concepts AS
SELECT * FROM read_parquet('${STORE}/concepts/**/*.parquet');
