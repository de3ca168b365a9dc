"""What the generators' samples become on disk in the MRI domain: NIfTI volumes on a real grid and affine
(`nifti`), and the volume writer of generate.py with its three-plane montages (`volumes`)."""
