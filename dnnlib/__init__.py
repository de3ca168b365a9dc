"""dnnlib: small utilities shared by every room of the project (config dicts, class lookup, downloads)."""

from .util import (  # noqa: F401
    EasyDict,
    atomic_output,
    DownloadError,
    ProgressBar,
    call_func_by_name,
    construct_class_by_name,
    format_time,
    get_obj_by_name,
    make_cache_dir_path,
    open_url,
    parse_range,
)
