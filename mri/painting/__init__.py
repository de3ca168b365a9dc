"""Painting in brains: repaint masks for training (masks), placement of new tumours and healing in real cases
(place, insert), the sources of label maps (label_sources), and the baselines the paint model is measured against
(baselines). The network family itself lives in training/paint.py (the engine knows no MRI)."""
