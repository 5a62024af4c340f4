"""stores: every byte on disk — Parquet tables and their schemas, shard manifests, the DuckDB catalog,
FAISS indexes."""
