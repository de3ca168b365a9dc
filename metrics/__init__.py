"""Evaluation metrics of generated images (FID, KID, precision/recall, IS, PPL, MS-SSIM diversity, nearest
neighbour memorisation and per-class FID), with the registry in ``metrics.metric_main``; see docs/metrics.md."""
