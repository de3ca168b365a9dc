"""What both snapshot readers share (``torch_utils.snapshot`` for our ``.pt`` files, ``torch_utils.legacy`` for
NVlabs pickles): the format tag of the plain data they return and their errors. Its own module so that the
two readers import it and not each other."""

SNAPSHOT_FORMAT = 'mri-gan-snapshot/1'


class SnapshotError(RuntimeError):
    """A snapshot file is unreadable or names something this project does not build."""


class PickleRefused(SnapshotError):
    """A pickle names a global outside the admitted set (it would run code)."""
