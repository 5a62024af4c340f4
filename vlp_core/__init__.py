"""vlp_core: the library (encoders, objectives, data sources, ingest logic). Imports no Prefect."""

__version__ = "0.1.0"
