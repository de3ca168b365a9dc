"""MRI package: everything specific to brain MRI (data, preprocessing, 3D networks, training hooks, metrics)."""
