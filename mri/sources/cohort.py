"""Cohort labels from BraTS case ids, so that one conditional model can learn from several collections at once.

The BraTS 2023+ challenges name every case `BraTS-<COHORT>-<patient>-<timepoint>` (Baid et al., arXiv:2107.02314;
BraTS-Africa: Adewole et al., arXiv:2305.19369; meningioma: LaBella et al., arXiv:2305.07642; paediatric: Kazerooni
et al., arXiv:2305.17033; metastases: Moawad et al., arXiv:2306.00838). `dataset_tool.py --labels cohort` turns that
prefix into a one-hot label group `cohort`, so a generator trained on BraTS-GLI and BraTS-Africa together can be
asked for the small collection's population (`generate.py --class ssa`), the question the BraTS-Africa StyleGAN
report ends on.

A spec is `cohort` (the values are the cohorts of the converted cases, sorted) or `cohort=gli,ssa` (a fixed list,
in that order: two archives converted with the same list have the same label layout, so a model pre-trained on one
can be fine-tuned on the other with `train.py --resume SNAPSHOT`).
"""

import re

# Prefix (upper case) -> label name. Unknown but well-formed prefixes become their lower-case selves.
KNOWN_COHORTS = {
    'GLI': 'gli',       # adult glioma (BraTS 2021/2023 GLI)
    'SSA': 'ssa',       # sub-Saharan Africa glioma (BraTS-Africa)
    'MEN': 'men',       # meningioma
    'MEN-RT': 'men_rt', # meningioma radiotherapy planning
    'MET': 'met',       # brain metastases
    'PED': 'ped',       # paediatric tumours
    'GOAT': 'goat',     # generalisability across tumours
    'PHT': 'pht',       # this project's phantom cases (mri.sources.phantom)
}
_PREFIX_RE = re.compile(r'^BraTS-(?P<cohort>[A-Za-z]+(?:-RT)?)-\d')
_LEGACY_RE = re.compile(r'^BraTS(?:20)?\d\d[_-]', re.IGNORECASE)  # BraTS2021_00000, BraTS20_Training_001: adult glioma


class CohortError(ValueError):
    """A case id has no cohort prefix, or a cohort outside a fixed list; one line naming the case."""


def is_cohort_spec(spec) -> bool:
    return spec == 'cohort' or str(spec).startswith('cohort=')


def parse_spec(spec):
    """`cohort` -> None (values from the cases); `cohort=gli,ssa` -> ['gli', 'ssa']."""
    if spec == 'cohort':
        return None
    values = [v.strip().lower() for v in spec.partition('=')[2].split(',') if v.strip()]
    if not values or len(set(values)) != len(values):
        raise CohortError(f'--labels {spec}: expected cohort or cohort=NAME,NAME,... with distinct names (e.g. cohort=gli,ssa)')
    return values


def cohort_of(case_id) -> str:
    """The cohort label name of a BraTS case id, e.g. BraTS-SSA-00012-000 -> 'ssa'."""
    m = _PREFIX_RE.match(case_id)
    if m:
        prefix = m.group('cohort').upper()
        return KNOWN_COHORTS.get(prefix, prefix.lower().replace('-', '_'))
    if _LEGACY_RE.match(case_id):
        return 'gli'
    raise CohortError(f'case {case_id}: --labels cohort needs BraTS case ids such as BraTS-GLI-00000-000 or '
                      f'BraTS2021_00000; label other collections with a CSV column instead (--labels cases.csv)')


def cohort_values(case_ids, spec):
    """The values of the cohort group for these cases: the fixed list of the spec, or the cohorts found, sorted.
    Raises CohortError for a case without a prefix or outside the fixed list."""
    fixed = parse_spec(spec)
    found = {}
    for cid in case_ids:
        found.setdefault(cohort_of(cid), cid)
    if fixed is None:
        return sorted(found)
    outside = [c for c in sorted(found) if c not in fixed]
    if outside:
        raise CohortError(f'case {found[outside[0]]}: cohort {outside[0]} is not in --labels {spec} '
                          f'(add it to the list, or leave such cases out)')
    return fixed


def unknown_prefixes(values):
    """The cohort names that are not in KNOWN_COHORTS (reported in the conversion summary)."""
    return [v for v in values if v not in KNOWN_COHORTS.values()]
