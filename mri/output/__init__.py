"""What the generators' samples become on disk in the MRI domain: NIfTI volumes on a real grid and affine
(`nifti`), the image writer of generate.py (`images`: PNG/npy per channel, label maps, class grids), its volume
writer with three-plane montages (`volumes`), BraTS / nnU-Net datasets (`datasets`) and their provenance
(`manifest`)."""
