"""Downstream evaluation: does synthetic data help tumour segmentation?

`calc_segmentation.py` is the CLI; this package holds the protocol (k-fold cross-validation by case, arms real /
real+synthetic / synthetic / pretrained+finetune), the data plumbing between archives, snapshots and MONAI, the
BraTS region scores, the statistics and the report. MONAI (Cardoso et al., "MONAI: An open-source framework for
deep learning in healthcare", arXiv:2211.02701) supplies the networks, losses, metrics and sliding-window
inference; it is imported lazily, so that the generator's own modules never pay for it.
"""
