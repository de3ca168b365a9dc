"""The MRI domain, in subpackages by what they are: `mri.sources` (BraTS and phantom sources, preprocessing,
conversion into archives), `mri.output` (generate.py's writers: images, NIfTI volumes, datasets), `mri.downstream`
(the segmentation benchmark on MONAI); `mri.seg` (the BraTS tumour labels as channels) and `mri.volume_space`
(grids and affines) serve all of them. The GAN engine itself (networks, ADA, hooks, loop) is `training/`."""
