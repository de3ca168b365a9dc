"""Just-in-time build of the project's CUDA plugins (upfirdn2d, bias_act) with ninja.

The plugins accelerate two ops of StyleGAN2 (Karras et al., "Analyzing and Improving the Image Quality of
StyleGAN", CVPR 2020; "Training Generative Adversarial Networks with Limited Data", NeurIPS 2020). Every op
also has a pure-PyTorch reference, so a plugin is an optimisation, never a requirement: `get_plugin` raises
on any failure and the caller warns once and falls back.

Builds live under `$MRI_GAN_CACHE/torch_extensions` (default `~/.cache/mri_gan/torch_extensions`), one
folder per digest of (source files, GPU name and compute capability, torch and CUDA versions, build
options): an edited source or another GPU gets a fresh build, the same combination reuses the old one.
"""

import hashlib
import os
import shutil
import uuid
import warnings

import torch
import torch.utils.cpp_extension

import dnnlib

verbosity = 'brief'  # 'none' = silent, 'brief' = one status line per plugin, 'full' = compiler output.

_loaded_plugins = dict()  # module_name -> loaded extension module (one build per process).


def _gpu_description() -> str:
    """What a compiled plugin depends on besides its sources: the GPU, the torch ABI and the CUDA runtime."""
    index = torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(index)
    return (f'gpu={torch.cuda.get_device_name(index)};sm={major}{minor};'
            f'torch={torch.__version__};cuda={torch.version.cuda}')


def _source_digest(paths: list, extra: str) -> str:
    """Digest of the file names and contents plus `extra`; names matter because #include uses them."""
    h = hashlib.sha256()
    for path in paths:
        h.update(os.path.basename(path).encode('utf-8') + b'\0')
        with open(path, 'rb') as f:
            h.update(f.read())
        h.update(b'\0')
    h.update(extra.encode('utf-8'))
    return h.hexdigest()


def _populate_build_dir(build_dir: str, paths: list) -> None:
    """Copy the sources into `build_dir`, atomically, so concurrent processes (DDP ranks) never see half a tree."""
    if os.path.isdir(build_dir):
        return
    parent = os.path.dirname(build_dir)
    os.makedirs(parent, exist_ok=True)
    staging = os.path.join(parent, f'.staging-{uuid.uuid4().hex}')
    os.makedirs(staging)
    try:
        for path in paths:
            shutil.copyfile(path, os.path.join(staging, os.path.basename(path)))
        try:
            os.replace(staging, build_dir)
        except OSError:
            # Another process won the race and its tree has the same digest, hence the same contents.
            if not os.path.isdir(build_dir):
                raise
    finally:
        if os.path.isdir(staging):
            shutil.rmtree(staging, ignore_errors=True)


def get_plugin(
    module_name,        # Python name of the extension module, e.g. 'mri_gan_upfirdn2d_plugin'.
    sources,            # Source file names (.cpp, .cu), relative to source_dir.
    headers=None,       # Header file names the sources include: part of the digest, copied beside them.
    source_dir=None,    # Folder of sources and headers; None = paths are used as given.
    **build_kwargs,     # Passed on to torch.utils.cpp_extension.load (extra_cuda_cflags, ...).
):
    """Build (or reuse) and import a CUDA extension. Raises RuntimeError naming the reason on any failure."""
    assert verbosity in ['none', 'brief', 'full']
    if module_name in _loaded_plugins:
        return _loaded_plugins[module_name]

    headers = list(headers or [])
    if source_dir is not None:
        sources = [os.path.join(source_dir, name) for name in sources]
        headers = [os.path.join(source_dir, name) for name in headers]
    for path in list(sources) + headers:
        if not os.path.isfile(path):
            raise RuntimeError(f'custom_ops: plugin source {path} does not exist')

    # Fail early, with a reason a person can act on, before torch's own less specific errors.
    if not torch.cuda.is_available():
        raise RuntimeError(f'custom_ops: cannot build {module_name}: no CUDA device is available')
    if torch.utils.cpp_extension.CUDA_HOME is None:
        raise RuntimeError(f'custom_ops: cannot build {module_name}: no CUDA toolkit found (set CUDA_HOME or put nvcc on PATH)')
    try:
        torch.utils.cpp_extension.verify_ninja_availability()
    except RuntimeError as exc:
        raise RuntimeError(f'custom_ops: cannot build {module_name}: ninja is not available ({exc})') from exc

    if verbosity == 'brief':
        print(f'Setting up PyTorch plugin "{module_name}"... ', end='', flush=True)
    elif verbosity == 'full':
        print(f'Setting up PyTorch plugin "{module_name}"...', flush=True)
    try:
        extra = _gpu_description() + ';kwargs=' + repr(sorted(build_kwargs.items()))
        digest = _source_digest(list(sources) + headers, extra)
        build_root = dnnlib.make_cache_dir_path('torch_extensions')
        build_dir = os.path.join(build_root, module_name, digest[:24])
        _populate_build_dir(build_dir, list(sources) + headers)
        copied_sources = [os.path.join(build_dir, os.path.basename(path)) for path in sources]
        # ninja in the digest folder: an unchanged build is a no-op and only the import happens.
        module = torch.utils.cpp_extension.load(
            name=module_name,
            sources=copied_sources,
            build_directory=build_dir,
            verbose=(verbosity == 'full'),
            **build_kwargs,
        )
    except Exception as exc:  # A build fails as RuntimeError, OSError, ImportError or CalledProcessError alike.
        if verbosity == 'brief':
            print('Failed!', flush=True)
        raise RuntimeError(f'custom_ops: building {module_name} failed: {type(exc).__name__}: {exc}') from exc
    if verbosity == 'brief':
        print('Done.', flush=True)
    _loaded_plugins[module_name] = module
    return module


def cache_dir() -> str:
    """Root folder of the plugin builds (for tools that want to clear it)."""
    return dnnlib.make_cache_dir_path('torch_extensions')



class LazyPlugin:
    """A plugin that is built on first use; a failed build warns once and is never retried in this process.

    Ops call `get()` only for CUDA tensors; None means "use the reference". `get_plugin` is looked up on
    this module at call time, so tests can monkeypatch `custom_ops.get_plugin` to force a failure.
    """

    def __init__(
        self,
        op_name,            # Name of the op in the warning, e.g. 'upfirdn2d'.
        module_name,        # Extension module name passed to get_plugin.
        sources,            # Source file names relative to source_dir.
        headers=None,       # Header file names relative to source_dir.
        source_dir=None,    # Folder of the sources.
        **build_kwargs,     # Passed on to get_plugin.
    ):
        self.op_name = op_name
        self.module_name = module_name
        self.sources = list(sources)
        self.headers = list(headers or [])
        self.source_dir = source_dir
        self.build_kwargs = build_kwargs
        self.module = None
        self.failure = None  # One-line reason of the failed build, once it failed.

    def get(self):
        if self.module is None and self.failure is None:
            try:
                self.module = get_plugin(self.module_name, self.sources, headers=self.headers,
                                         source_dir=self.source_dir, **self.build_kwargs)
            except Exception as exc:  # Any failure at all means the same thing here: use the reference.
                self.failure = f'{type(exc).__name__}: {exc}'
                warnings.warn(f'{self.op_name}: the CUDA plugin is unavailable ({self.failure}); '
                              f'falling back to the slower PyTorch reference for the rest of this run',
                              RuntimeWarning, stacklevel=3)
        return self.module

    def disable(self, reason='disabled by the caller'):
        """Use the reference from now on, without a warning (benchmarks time the reference this way)."""
        self.module = None
        self.failure = reason

    def reset(self):
        """Forget the build result (tests only): the next get() tries again."""
        self.module = None
        self.failure = None
