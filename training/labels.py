"""Class labels by name: ``axial``, ``axial,t2w`` (one value per group), an index (one group only), or ``all``.

The label vector is the concatenation of named one-hot groups (DESIGN.md); these helpers turn what a person
types into vectors and back, and list the valid names when something does not match.
"""

import itertools

import numpy as np


class ClassSpecError(ValueError):
    """A --class value that names nothing valid; the message lists what is valid."""


def _groups(label_names, label_groups):
    if label_groups:
        return [dict(name=g['name'], values=list(g['values'])) for g in label_groups]
    return [dict(name='class', values=list(label_names))] if label_names else []


def valid_names_text(label_names, label_groups) -> str:
    groups = _groups(label_names, label_groups)
    return '; '.join(f'{g["name"]}: {", ".join(g["values"])}' for g in groups) or '(none: the network is unconditional)'


def parse_class(spec, label_names, label_groups=None) -> np.ndarray:
    """One label vector for ``spec`` (names, comma-separated per group, or an integer index when there is one group)."""
    label_names = list(label_names or [])
    dim = len(label_names)
    groups = _groups(label_names, label_groups)
    if spec is None or spec == '':
        if dim:
            raise ClassSpecError(f'this network is conditional: pass --class (valid: {valid_names_text(label_names, label_groups)})')
        return np.zeros([0], dtype=np.float32)
    if dim == 0:
        raise ClassSpecError(f'--class {spec}: this network is unconditional; drop --class')
    spec = str(spec).strip()
    vec = np.zeros([dim], dtype=np.float32)
    if spec.lstrip('-').isdigit():
        idx = int(spec)
        if len(groups) > 1:
            # One index sets one bit, but every group needs one: the result would be a label never trained on.
            raise ClassSpecError(f'--class {spec}: an index is ambiguous with {len(groups)} label groups; give one name '
                                 f'per group, e.g. {",".join(g["values"][0] for g in groups)} '
                                 f'(valid: {valid_names_text(label_names, label_groups)})')
        if not 0 <= idx < dim:
            raise ClassSpecError(f'--class {idx}: index out of range 0..{dim - 1} ({", ".join(label_names)})')
        vec[idx] = 1
        return vec
    offsets = np.cumsum([0] + [len(g['values']) for g in groups])
    chosen = {}
    for token in [t.strip() for t in spec.split(',') if t.strip()]:
        hits = [(gi, g['values'].index(token)) for gi, g in enumerate(groups) if token in g['values']]
        if not hits:
            raise ClassSpecError(f'--class {spec}: unknown name {token!r}; valid: {valid_names_text(label_names, label_groups)}')
        gi, vi = hits[0]
        if gi in chosen:
            raise ClassSpecError(f'--class {spec}: two values for group {groups[gi]["name"]!r}; give one per group')
        chosen[gi] = vi
    if len(chosen) != len(groups):
        missing = [groups[gi]['name'] for gi in range(len(groups)) if gi not in chosen]
        raise ClassSpecError(f'--class {spec}: no value for group(s) {", ".join(missing)}; '
                             f'valid: {valid_names_text(label_names, label_groups)}')
    for gi, vi in chosen.items():
        vec[offsets[gi] + vi] = 1
    return vec


def all_classes(label_names, label_groups=None, limit: int = 64):
    """Every combination of one value per group: ``[(name, vector)]`` (for --class all grids)."""
    groups = _groups(label_names, label_groups)
    out = []
    for combo in itertools.product(*[g['values'] for g in groups]):
        name = ','.join(combo)
        out.append((name, parse_class(name, label_names, label_groups)))
        if len(out) >= limit:
            break
    return out
