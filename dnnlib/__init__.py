"""dnnlib: small utilities shared by every room of the project (config dicts, class lookup, downloads, atomic
writes, and how a script ends on Ctrl-C, SIGTERM or a full disk)."""

from .util import (  # noqa: F401
    EasyDict,
    atomic_output,
    DownloadError,
    LockBusy,
    PidLock,
    ProgressBar,
    call_func_by_name,
    construct_class_by_name,
    format_time,
    get_obj_by_name,
    make_cache_dir_path,
    open_url,
    parse_range,
    usable_cpus,
)
from .script import (  # noqa: F401
    DiskFullError,
    disk_full_message,
    exit_interrupted,
    exit_on_interrupt,
    interrupt_exit_code,
    run_cli,
    sigterm_as_interrupt,
    stop_reason,
    terminated_by_sigterm,
)
