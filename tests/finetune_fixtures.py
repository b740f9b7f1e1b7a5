"""Pieces of the fine-tuning tests: labeling runs written in this process by the labeling job's own
per-shard worker (`ShardLabeler`, what each Ray actor runs), and small fine-tune configs."""

from __future__ import annotations

import dataclasses

from pipeline.config import load_config
from pipeline.io.shards import expand_shards
from pipeline.outputs import prepare_output, write_vocabulary
from pipeline.stages.shard import ShardLabeler
from pipeline.train.config import FinetuneCfg
from pipeline.vocab import resolve_vocabulary

# The shipped shapes-clip with one plain pass: fast labels, still a real teacher.
LABEL_FAST = ["prompts.templates=single", "infer.batch_size=8", "infer.shifts=1", "infer.pamr_steps=0"]

# A few steps of a small student (the model is shapes-clip's; the new parts are narrow).
FINETUNE_FAST = [
    "optim.steps=4",
    "optim.batch_size=4",
    "optim.warmup=1",
    "student.fpn_width=16",
    "student.fpn_head_width=16",
    "student.decoder_width=32",
    "student.decoder_layers=1",
    "data.shuffle_buffer=8",
    "data.loader_workers=0",
    "checkpoint_every=2",
    "log_every=2",
]


def label_in_process(inputs: str, output: str, *overrides: str, storage_options: dict | None = None) -> None:
    """A labeling run of every shard under `inputs` into `output`, with the labeling job's output contract."""
    cfg = load_config(None, [*LABEL_FAST, *overrides])
    cfg = dataclasses.replace(cfg, input=[inputs], output=output, storage_options=dict(storage_options or {}))
    vocab = resolve_vocabulary(cfg.vocab, inputs, storage_options)
    prepare_output(cfg, vocab)
    labeler = ShardLabeler(cfg, vocab)
    write_vocabulary(output, vocab, list(labeler.dense.templates), "test", storage_options)
    for url in expand_shards(cfg.input, storage_options):
        labeler(url)


def finetune_config(
    labels: list[str], output: str, *overrides: str, storage_options: dict | None = None
) -> FinetuneCfg:
    cfg = load_config(None, [*FINETUNE_FAST, *overrides], cls=FinetuneCfg)
    return dataclasses.replace(cfg, labels=labels, output=output, storage_options=dict(storage_options or {}))
