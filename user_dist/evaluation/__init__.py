"""Evaluation: retrieval metrics and protocols, encoding a split, the report page.

- :mod:`.metrics`: exact ranks (pessimistic ties), R@K / medr / meanr / rsum,
  protocols coco5k, coco1k (5 folds, averaged), f30k, generic.
- :mod:`.encode`: each image and caption of a split encoded once, in order,
  gathered over ranks.
- :mod:`.report`: the terminal table and the HTML page per checkpoint.
- :mod:`.extended`: ECCV Caption, CxC and PMRP on COCO 5K (extended positives),
  through NAVER's ``eccv_caption`` package, when the split has COCO caption ids.

The job that ties them to checkpoints and run folders is ``launch/evaluate.py``.
"""
from user_dist.evaluation.metrics import METRIC_KEYS, PROTOCOL_IMAGES, ProtocolError, evaluate

__all__ = ["METRIC_KEYS", "PROTOCOL_IMAGES", "ProtocolError", "evaluate"]
