"""Per-class FID: one Frechet Inception Distance (Heusel et al., NeurIPS 2017) per value of a label group
(e.g. per imaging plane), between the real images of that class and images generated conditioned on it.

Conditioning labels are drawn from the real images of the class, so the other label groups (e.g. modality)
keep their real distribution within the class. Real statistics are cached per class.
"""

import numpy as np

from metrics import frechet_inception_distance
from metrics import metric_utils


def class_members(dataset, group_name: str = None) -> tuple:
    """``(group name, {value: indices of real items with that value})`` for one label group (default: the first)."""
    groups = list(getattr(dataset, 'label_groups', None) or [])
    if not groups:
        raise metric_utils.MetricError(f'{getattr(dataset, "path", "dataset")}: has no labels; fid_per_class needs a '
                                       f'labelled archive')
    names = [g['name'] for g in groups]
    if group_name is None:
        group_name = names[0]
    if group_name not in names:
        raise metric_utils.MetricError(f'unknown label group {group_name!r}; the data has {names}')
    pos = names.index(group_name)
    offset = sum(len(g['values']) for g in groups[:pos])
    labels = metric_utils.dataset_labels(dataset)
    members = {}
    for j, value in enumerate(groups[pos]['values']):
        members[str(value)] = np.flatnonzero(labels[:, offset + j] > 0.5)
    return group_name, members, labels


def compute_fid_per_class(opts, num_gen: int, group_name: str = None) -> dict:
    """``{class: {suffix: fid}}`` for every class with at least two real images."""
    dataset = metric_utils.get_dataset(opts)
    group_name, members, labels = class_members(dataset, group_name)
    out = {}
    for value, indices in members.items():
        if len(indices) < 2:
            continue  # A covariance needs two images; the class is absent or nearly so.
        out[value] = frechet_inception_distance.compute_fid(opts, max_real=None, num_gen=num_gen, labels=labels[indices],
                                                            real_indices=indices, tag=f'{group_name}={value}')
    if not out:
        raise metric_utils.MetricError(f'no class of label group {group_name!r} has two or more real images')
    return out
