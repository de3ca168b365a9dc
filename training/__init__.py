"""2D StyleGAN2-ADA: networks, loss, augmentation, datasets and the training loop."""
