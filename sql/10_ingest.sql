-- One row per distinct image (content hash): the first place it was found (by source, uri).
-- The JPEG bytes stay in the `image` column; select it explicitly when you need pixels.
CREATE OR REPLACE VIEW images AS
SELECT * EXCLUDE (image), image
FROM images_raw
QUALIFY row_number() OVER (PARTITION BY image_id ORDER BY source, uri) = 1;

-- Every place an image was found (duplicates across folders, sources or symlinks).
CREATE OR REPLACE VIEW image_sources AS
SELECT image_id, source, uri, category, filename FROM images_raw;

-- One row per distinct normalised sentence, with the Parquet file it is read from (the corpus stages plan
-- over sentence ids and files, so a shard reads its sentences from its files).
CREATE OR REPLACE VIEW texts_located AS
SELECT *
FROM store_table('texts')
QUALIFY row_number() OVER (PARTITION BY text_id ORDER BY source, uri) = 1;

CREATE OR REPLACE VIEW texts AS
SELECT * EXCLUDE (filename) FROM texts_located;

-- Captions that came with images (hidden from the unpaired pipeline; used for paired mode and evaluation).
CREATE OR REPLACE VIEW known_pairs AS
SELECT DISTINCT image_id, text_id, source, kind, text FROM known_pairs_raw;

CREATE OR REPLACE VIEW rejects_by_reason AS
SELECT stage, source, reason, count(*) AS n, min(input_id) AS example_input, any_value(detail) AS example_detail
FROM rejects
GROUP BY ALL
ORDER BY stage, source, n DESC;

CREATE OR REPLACE VIEW ingest_summary AS
WITH img AS (
    SELECT source, count(*) AS image_rows, count(DISTINCT image_id) AS distinct_images
    FROM images_raw GROUP BY source
), txt AS (
    SELECT source, count(*) AS text_rows, count(DISTINCT text_id) AS distinct_texts
    FROM texts_raw GROUP BY source
), kp AS (
    SELECT source, count(*) AS known_pairs FROM known_pairs GROUP BY source
), rej AS (
    SELECT source, count(*) AS rejects FROM rejects WHERE stage = 'ingest' GROUP BY source
), src AS (
    SELECT source FROM img UNION SELECT source FROM txt UNION SELECT source FROM rej
)
SELECT src.source,
       coalesce(image_rows, 0) AS image_rows, coalesce(distinct_images, 0) AS distinct_images,
       coalesce(text_rows, 0) AS text_rows, coalesce(distinct_texts, 0) AS distinct_texts,
       coalesce(known_pairs, 0) AS known_pairs, coalesce(rejects, 0) AS rejects
FROM src
LEFT JOIN img USING (source) LEFT JOIN txt USING (source) LEFT JOIN kp USING (source)
LEFT JOIN rej USING (source)
ORDER BY src.source;
