"""Per-batch stages of a labeling run: dense inference (`infer`), then writing (`write`).

Stages hold no Ray code; `pipeline.distribute` chains them per shard.
"""
