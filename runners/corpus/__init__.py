"""Bulk embedding of a corpus: files in, Parquet out (docs/corpus.md).

The command (`python -m runners.corpus`, runners.corpus.command) reads JSONL, CSV or Parquet in shards
(runners.corpus.io), embeds them in this process or against running servers (runners.corpus.embedder,
runners.corpus.client) and writes one Parquet file per shard; runners.corpus.ray_stage is the same
embedder as a Ray Data stage. Nothing here is imported by the service.
"""
