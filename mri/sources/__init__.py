"""MRI sources and their conversion into dataset archives.

BraTS case discovery and validation (`brats`), the BraTS-Africa download (`download`), synthetic BraTS-format
phantom cases (`phantom`), cohort labels from case ids (`cohort`), preprocessing to RAS-canonical, brain-cropped,
resampled, normalised arrays (`preprocess`), plain image folders (`image_folder`), the archive writer (`archive`)
and the conversion that ties them together for dataset_tool.py (`convert`).
"""
