#!/usr/bin/env bash
# The main job on the bundled real data: start the local Prefect server + worker (registering the
# deployments of prefect.yaml), build the corpus through them, pre-train ALBEF (tiny, CPU) on its retrieved
# pairs with zero-shot retrieval on the held-out clip art, fine-tune on easy-VQA, build the bundled downstream
# tasks and fine-tune the RefCOCO+-shaped one (referring expressions), and print the numbers.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VLP_VENV:-.venv}
export DO_NOT_TRACK=1 PREFECT_SERVER_ANALYTICS_ENABLED=false

"$VENV/bin/vlp" serve
"$VENV/bin/vlp" run build-corpus/quickstart
"$VENV/bin/vlp" sql "select * from ingest_summary"
"$VENV/bin/vlp" sql "select stage, source, reason, n, example_input from rejects_by_reason" \
  --title "rejects by stage and reason" --empty "no rejects"
"$VENV/bin/vlp" sql "select * from tag_coverage"
"$VENV/bin/vlp" sql "select image_id, category, tag_sentence, rank, round(score, 3) score, text from retrieval_browser where source = 'openclipart' order by image_id, rank" --limit 15
"$VENV/bin/vlp" run pretrain/albef
"$VENV/bin/vlp" run finetune/vqa
"$VENV/bin/vlp" run build-tasks/bundled
"$VENV/bin/vlp" sql "select task, split, examples, labels, chance, chance_of from task_summary" \
  --title "bundled downstream tasks"
"$VENV/bin/vlp" run finetune/refcoco
"$VENV/bin/vlp" runs --metrics vqa_accuracy,accuracy_testA,accuracy_testB
cat <<MSG

Done. The Prefect UI is at http://127.0.0.1:4200 (server and worker keep running; stop them: .venv/bin/vlp stop).
Training runs (checkpoints, metrics.jsonl, TensorBoard): data/runs/train/
Inspect the corpus:  .venv/bin/vlp sql "select category, count(*) from images group by 1"
               or:  .venv/bin/duckdb -readonly data/catalog.duckdb
MSG
