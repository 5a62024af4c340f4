-- Corpus quality, where known pairs exist (Open Clip Art titles/descriptions/keywords): did retrieval find
-- the image's own caption (alignment), and do retrieved sentences come from images of the same category?
-- One row per image that has both known pairs and retrieved sentences. Random baselines: vlp corpus report.
CREATE OR REPLACE VIEW text_categories AS
SELECT DISTINCT k.text_id, i.category
FROM known_pairs k JOIN images i USING (image_id)
WHERE i.category IS NOT NULL;

CREATE OR REPLACE VIEW retrieval_eval AS
WITH own AS (
    SELECT image_id, list(DISTINCT text_id) AS own_texts FROM known_pairs GROUP BY image_id
), scored AS (
    SELECT r.image_id, r.rank, i.category,
           list_contains(o.own_texts, r.text_id) AS own,
           EXISTS (SELECT 1 FROM text_categories c WHERE c.text_id = r.text_id AND c.category = i.category)
               AS same_category
    FROM retrieved_pairs r JOIN own o USING (image_id) JOIN images i USING (image_id)
)
SELECT s.image_id, any_value(s.category) AS category, len(any_value(o.own_texts)) AS n_own,
       count(*) AS k,
       bool_or(s.own AND s.rank = 1) AS aligned_at_1,
       bool_or(s.own) AS aligned_at_k,
       bool_or(s.same_category) AS category_at_k,
       avg(s.same_category::INT) AS category_precision_at_k
FROM scored s JOIN own o USING (image_id)
GROUP BY s.image_id;

CREATE OR REPLACE VIEW corpus_quality AS
SELECT count(*) AS images_evaluated,
       avg(aligned_at_1::INT) AS alignment_at_1,
       avg(aligned_at_k::INT) AS alignment_at_k,
       avg(category_at_k::INT) AS category_at_k,
       avg(category_precision_at_k) AS category_precision_at_k,
       (SELECT avg(coverage) FROM tag_coverage) AS mean_tag_coverage,
       (SELECT count(DISTINCT image_id) FROM phrase_links) / greatest((SELECT count(*) FROM images), 1)
           AS link_rate,
       (SELECT count(*) FROM rejects) AS rejects
FROM retrieval_eval;
