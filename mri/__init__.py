"""The MRI domain, in subpackages by what they are: `mri.sources` (BraTS and phantom sources, preprocessing,
conversion into archives), `mri.output` (NIfTI volumes and the volume writer of generate.py), `mri.downstream`
(the segmentation benchmark on MONAI); `mri.seg` (the BraTS tumour labels as channels) and `mri.volume_space`
(grids and affines) serve all of them. The GAN engine itself (networks, ADA, hooks, loop) is `training/`."""
