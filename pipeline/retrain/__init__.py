"""Scheduled, idempotent retraining: new committed label shards become a better model version, or nothing.

`step.retrain_step` is one step (what `clipdense retrain` and the k8s CronJob run); `watermark` lists
the committed shards a version is trained on, `lease` keeps two steps off one key, `score` is the
publishing gate, `versions` publishes `vNNNN/` and moves the `latest` pointer last.
"""

from pipeline.retrain.config import RetrainCfg
from pipeline.retrain.step import retrain_step

__all__ = ["RetrainCfg", "retrain_step"]
