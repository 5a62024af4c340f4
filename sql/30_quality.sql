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

-- VLMixer cross-modal CutMix coverage of the text corpus. A sentence's grounded words (`ground` stage) are
-- the CMC candidates; CMC replaces each with probability p = 0.5 and at least one per sentence that has any
-- (vlp_core.language.cutmix_choices defaults), so a sentence with n grounded spans replaces each with
-- probability p + (1 - p)^n / n: expected_replaced_spans sums that, expected_replaced_words weighs each span
-- by its words. Words are whitespace-separated (a grounded "traffic light" is 2 words). Rows: origin 'all'
-- (the whole gallery), then per patch origin (detector | image_tag): the coverage CMC would have with only
-- the concepts that have patches of that origin (not additive: a concept can have both).
CREATE OR REPLACE VIEW cmc_coverage AS
WITH concept_origin AS (
    SELECT DISTINCT concept, 'all' AS origin FROM patch_gallery
    UNION SELECT DISTINCT concept, origin FROM patch_gallery
), origins AS (
    SELECT DISTINCT origin FROM concept_origin UNION SELECT 'all'
), per_sentence AS (
    SELECT o.origin, w.text_id, count(*) AS n,
           sum(len(string_split_regex(trim(w.word), '\s+'))) AS n_words
    FROM grounded_words w JOIN concept_origin o USING (concept)
    WHERE w.text_id IN (SELECT text_id FROM texts)
    GROUP BY ALL
), corpus AS (
    SELECT count(*) AS sentences, coalesce(sum(len(string_split_regex(trim(text), '\s+'))), 0) AS words
    FROM texts
), agg AS (
    SELECT o.origin, count(s.text_id) AS grounded_sentences, coalesce(sum(s.n), 0) AS grounded_words,
           coalesce(sum(0.5 * s.n + pow(0.5, s.n)), 0) AS expected_replaced_spans,
           coalesce(sum((0.5 + pow(0.5, s.n) / s.n) * s.n_words), 0) AS expected_replaced_words
    FROM origins o LEFT JOIN per_sentence s USING (origin)
    GROUP BY o.origin
)
SELECT a.origin, c.sentences, a.grounded_sentences,
       coalesce(a.grounded_sentences / nullif(c.sentences, 0), 0) AS grounded_share,
       a.grounded_words, a.expected_replaced_spans, c.words, a.expected_replaced_words,
       coalesce(a.expected_replaced_words / nullif(c.words, 0), 0) AS expected_replaced_share
FROM agg a CROSS JOIN corpus c
ORDER BY a.origin <> 'all', a.origin;
