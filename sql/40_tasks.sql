-- Downstream tasks: the examples of every task (bundled scene tasks and imported real datasets), their
-- images, label counts and the chance level of each split.

CREATE OR REPLACE VIEW task_examples AS
SELECT * EXCLUDE (filename) FROM store_table('task_examples');

-- The bundled tasks' images without their bytes (the png column is in store_table('task_images')).
CREATE OR REPLACE VIEW task_images AS
SELECT task, image, width, height, octet_length(png) AS png_bytes FROM store_table('task_images');

CREATE OR REPLACE VIEW task_labels AS
SELECT task, split, label, count(*) AS n
FROM task_examples
GROUP BY ALL
ORDER BY task, split, n DESC, label;

-- Chance per split: the majority label's share (classification, answers); the mean of 1 / candidates
-- (referring expressions); 1 / images (retrieval R@1 from a caption, text -> image).
CREATE OR REPLACE VIEW task_summary AS
WITH tot AS (
    SELECT task, split, count(*) AS examples, count(DISTINCT label) AS labels,
           avg(CASE WHEN len(boxes) > 0 THEN 1.0 / len(boxes) END) AS ref_chance,
           count(DISTINCT "group") AS groups, any_value(image_root) AS image_root
    FROM task_examples
    GROUP BY ALL
), top AS (
    SELECT task, split, max(n) AS n_top FROM task_labels WHERE label IS NOT NULL GROUP BY ALL
)
SELECT t.task, t.split, t.examples, t.labels,
       round(CASE WHEN t.ref_chance IS NOT NULL THEN t.ref_chance
                  WHEN t.labels > 0 THEN top.n_top / t.examples
                  ELSE 1.0 / nullif(t.groups, 0) END, 4) AS chance,
       CASE WHEN t.ref_chance IS NOT NULL THEN 'mean 1/candidates'
            WHEN t.labels > 0 THEN 'majority label'
            ELSE 'R@1 text->image: 1/images' END AS chance_of,
       t.image_root
FROM tot t LEFT JOIN top USING (task, split)
ORDER BY t.task, t.split;

-- The method x task benchmark: every metric of every (method, pairs mode, seed, task), and the headline
-- metric's mean ± sample std over seeds (seeds = how many seeds are in).
CREATE OR REPLACE VIEW leaderboard AS
SELECT * EXCLUDE (filename) FROM store_table('leaderboard');

CREATE OR REPLACE VIEW leaderboard_summary AS
SELECT method, pairs_mode, task, any_value(metric) AS metric, count(*) AS seeds,
       round(100 * avg(value), 2) AS mean, round(100 * coalesce(stddev_samp(value), 0), 2) AS std,
       round(100 * min(value), 2) AS min, round(100 * max(value), 2) AS max,
       list(seed ORDER BY seed) AS seed_list, budget
FROM leaderboard
WHERE headline
GROUP BY budget, method, pairs_mode, task
ORDER BY budget, task, mean DESC;
