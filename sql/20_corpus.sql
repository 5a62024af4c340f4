-- The weakly-aligned corpus, readable: each image's tags, its top-K retrieved sentences and their scores,
-- and whether the sentence happens to be one of the image's own captions (known pairs; evaluation only).
CREATE OR REPLACE VIEW retrieval_browser AS
SELECT r.image_id, i.uri, i.source, i.category, g.tag_sentence, r.rank, r.score, t.text, t.source AS text_source,
       EXISTS (SELECT 1 FROM known_pairs k WHERE k.image_id = r.image_id AND k.text_id = r.text_id) AS own_caption
FROM retrieved_pairs r
JOIN images i USING (image_id)
JOIN texts t USING (text_id)
LEFT JOIN image_tags g USING (image_id);

-- Tag-phrase links with the sentence they came from.
CREATE OR REPLACE VIEW links_detail AS
SELECT l.image_id, i.uri, l.region_idx, l.tag, l.phrase, l.score, l.mask_prob, t.text AS sentence
FROM phrase_links l
JOIN images i USING (image_id)
JOIN texts t USING (text_id);

-- Share of images with at least one tag, per image source.
CREATE OR REPLACE VIEW tag_coverage AS
SELECT i.source, count(*) AS images, count(*) FILTER (WHERE len(g.tags) > 0) AS tagged,
       round(count(*) FILTER (WHERE len(g.tags) > 0) / count(*), 4) AS coverage,
       count(*) FILTER (WHERE list_contains(g.tag_origins, 'detector')) AS with_detections
FROM images i JOIN image_tags g USING (image_id)
GROUP BY ALL ORDER BY i.source;

-- VLMixer patch gallery: concepts × gallery sizes (thumbnails in patch_gallery.thumbnail). origin: where the
-- concept's name comes from (detector label | image_tag); image_tag_patches: its whole-image patches.
CREATE OR REPLACE VIEW gallery_summary AS
SELECT c.concept, c.n_patches, count(DISTINCT g.image_id) AS images, round(avg(g.score), 3) AS mean_score,
       c.forms, c.origin, count(g.image_id) FILTER (WHERE g.origin = 'image_tag') AS image_tag_patches
FROM concepts c LEFT JOIN patch_gallery g USING (concept)
GROUP BY ALL ORDER BY c.n_patches DESC, c.concept;

-- Visually grounded words of every corpus sentence (the `ground` stage; VLMixer CMC candidates).
CREATE OR REPLACE VIEW grounded_words AS
SELECT * FROM read_parquet('${STORE}/grounded_words/**/*.parquet');
