"""The baselines a paint generator is measured against: a ring fill and an L1 U-Net inpainter.

Both expose the paint generator's call, ``fill(context, mask, labels) -> composite``, where every voxel outside the
mask is exactly the context:

- `RingFill`: the trivial fill. Each modality inside the mask gets the mean of a ring of healthy brain voxels around
  it (the mask dilated by ``width`` voxels, minus the mask, inside the brain). It knows nothing of labels: it
  paints healthy tissue only, the floor every learned inpainter must clear.
- `UNetInpainter`: the design that won the BraTS 2024 inpainting task (Zhang, Weng and Chen, "U-Net Based Healthy 3D
  Brain Tissue Inpainting", arXiv:2507.18126, first place in the ASNR-MICCAI BraTS Local Synthesis of Tissue via
  Inpainting challenge: SSIM 0.841, PSNR 23.26 dB, MSE 0.007 on its validation set): a U-Net that reads the scan
  with the region blanked and the mask, trained with an L1 loss on the region, on healthy tissue masked at random.
  Here it is MONAI's U-Net (one class for 2D and 3D through ``spatial_dims``, residual units as in
  mri/downstream/model.py) reading [context with the region blanked, mask, label map], so that, trained on the
  same repaint masks as the paint GAN (`mri.painting.masks.RepaintMasks`: tumours with their labels, tumour shapes
  in healthy tissue with all-zero labels), it answers the same question: "fill this region with tissue whose labels
  are L". With ``use_labels=False`` it reads [context, mask] only, as the challenge's model does.

An inpainter file is plain data (format, the constructor's arguments, state_dict, what training did), loaded with
``torch.load(weights_only=True)`` and rebuilt only from the MONAI class named here.
"""

import time

import numpy as np
import torch

import dnnlib
from torch_utils import records
from mri.painting.masks import dilate

INPAINTER_FORMAT = 'mri-gan-inpainter/1'


class BaselineError(ValueError):
    """Bad input to a baseline: names the file or argument and what is wrong."""


# ----------------------------------------------------------------------------
# Shared helpers.

def _check_call(context: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor = None) -> torch.Tensor:
    """Checks the paint call's shapes (context [N, P, *S], mask [N, 1, *S], labels [N, L, *S] or None); returns the
    mask as bool."""
    if context.ndim not in (4, 5):
        raise BaselineError(f'context must be [N, C, H, W] or [N, C, D, H, W], got shape {list(context.shape)}')
    spatial = list(context.shape[2:])
    sides = ', '.join(map(str, spatial))
    if mask.ndim != context.ndim or mask.shape[0] != context.shape[0] or mask.shape[1] != 1 \
            or list(mask.shape[2:]) != spatial:
        raise BaselineError(f'mask must be [{context.shape[0]}, 1, {sides}], got {list(mask.shape)}')
    if labels is not None and (labels.ndim != context.ndim or labels.shape[0] != context.shape[0]
                               or list(labels.shape[2:]) != spatial):
        raise BaselineError(f'labels must be [{context.shape[0]}, L, {sides}], got {list(labels.shape)}')
    return mask > 0.5 if mask.dtype != torch.bool else mask


def composite(painted: torch.Tensor, context: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``mask * painted + (1 - mask) * context``, written as a selection so that outside the mask the result is the
    context bit for bit (a product with 0 would turn a non-finite painted value into NaN there)."""
    return torch.where(mask, painted.to(context.dtype), context)


def brain_of(context: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The brain as the context shows it, outside the mask: any modality above the background value (-1)."""
    return ((context > -1 + 1e-3).any(dim=1, keepdim=True)) & ~mask


# ----------------------------------------------------------------------------
# Ring fill.

class RingFill:
    """Fill the mask, per sample and modality, with the mean of the healthy brain voxels in a ring around it."""

    def __init__(self, width: int = 3):     # ring width in voxels
        if width < 1:
            raise BaselineError(f'ring width must be at least 1 voxel, got {width}')
        self.width = int(width)

    @torch.no_grad()
    def fill(
        self,
        context: torch.Tensor,              # [N, P, *S] in [-1, 1]; values inside the mask are ignored
        mask: torch.Tensor,                 # [N, 1, *S] in {0, 1} (1 = repaint) or bool
        labels: torch.Tensor = None,        # [N, L, *S]; ignored: a ring fill paints healthy tissue only
        brain: torch.Tensor = None,         # [N, 1, *S] brain mask; None = where the context is above background
    ) -> torch.Tensor:
        """The composite ``[N, P, *S]``. Where a sample's ring holds no brain voxel (a mask that covers all the
        brain near it), the mean of its whole brain outside the mask is used; with no brain at all, background (-1)."""
        m = _check_call(context, mask, labels)
        healthy = brain_of(context, m) if brain is None else (brain > 0.5 if brain.dtype != torch.bool else brain) & ~m
        ring = dilate(m, self.width) & ~m & healthy
        dims = tuple(range(2, context.ndim))
        x = context.to(torch.float32)

        def masked_mean(where):
            count = where.sum(dim=dims, keepdim=True).to(torch.float32)
            total = (x * where).sum(dim=dims, keepdim=True)
            return total / count.clamp(min=1), count > 0

        ring_mean, has_ring = masked_mean(ring)
        brain_mean, has_brain = masked_mean(healthy)
        value = torch.where(has_ring, ring_mean, torch.where(has_brain, brain_mean, torch.full_like(ring_mean, -1.0)))
        return composite(value.expand_as(x), context, m)

    __call__ = fill


# ----------------------------------------------------------------------------
# L1 U-Net inpainter.

def _build_unet(spatial_dims: int, in_channels: int, out_channels: int, features: int, levels: int) -> torch.nn.Module:
    from monai.networks import nets
    return nets.UNet(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels,
                     channels=tuple(features * 2 ** i for i in range(levels)), strides=(2,) * (levels - 1),
                     num_res_units=2, norm='instance')


class UNetInpainter(torch.nn.Module):
    """MONAI U-Net reading [context with the region blanked, mask, label map], predicting the painted channels."""

    def __init__(
        self,
        spatial_dims: int,                  # 2 for images, 3 for volumes
        paint_channels: list,               # names of the channels it paints, e.g. ['t1n', 't1c', 't2w', 't2f']
        label_channels: list = (),          # names of the label-map channels it reads, e.g. ['seg_netc', ...]
        features: int = 16,                 # channels of the first level; doubled per level
        levels: int = 4,                    # resolution levels (strides of 2 between them)
        use_labels: bool = True,            # False = read [context, mask] only, as the challenge's model does
    ):
        super().__init__()
        if spatial_dims not in (2, 3):
            raise BaselineError(f'spatial_dims must be 2 or 3, got {spatial_dims}')
        if not paint_channels:
            raise BaselineError('the inpainter needs at least one channel to paint')
        self.init_kwargs = dict(spatial_dims=int(spatial_dims), paint_channels=list(paint_channels),
                                label_channels=list(label_channels), features=int(features), levels=int(levels),
                                use_labels=bool(use_labels))
        self.spatial_dims = int(spatial_dims)
        self.paint_channels = list(paint_channels)
        self.label_channels = list(label_channels) if use_labels else []
        in_channels = len(self.paint_channels) + 1 + len(self.label_channels)
        self.net = _build_unet(self.spatial_dims, in_channels, len(self.paint_channels), features, levels)

    @property
    def min_side(self) -> int:
        """The multiple a spatial side must be (the bottleneck keeps whole voxels)."""
        return 2 ** (self.init_kwargs['levels'] - 1)

    def forward(self, context: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor = None) -> torch.Tensor:
        """The raw prediction ``[N, P, *S]`` everywhere (training takes its L1 inside the mask)."""
        m = _check_call(context, mask, labels)
        if context.ndim - 2 != self.spatial_dims or context.shape[1] != len(self.paint_channels):
            raise BaselineError(f'this inpainter paints {len(self.paint_channels)} channels in {self.spatial_dims}D; '
                                f'got context of shape {list(context.shape)}')
        bad = [s for s in context.shape[2:] if s % self.min_side]
        if bad:
            raise BaselineError(f'spatial sides must be multiples of {self.min_side} for {self.init_kwargs["levels"]} '
                                f'levels; got {list(context.shape[2:])}')
        mf = m.to(context.dtype)
        parts = [context * (1 - mf), mf]  # The region is blanked to 0: the context's values there must not leak in.
        if self.label_channels:
            if labels is None:
                labels = torch.zeros([context.shape[0], len(self.label_channels)] + list(context.shape[2:]),
                                     dtype=context.dtype, device=context.device)
            if labels.shape[1] != len(self.label_channels):
                raise BaselineError(f'this inpainter reads {len(self.label_channels)} label channels '
                                    f'{self.label_channels}; got {labels.shape[1]}')
            parts.append((labels > 0.5).to(context.dtype))
        return self.net(torch.cat(parts, dim=1))

    @torch.no_grad()
    def fill(self, context: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor = None) -> torch.Tensor:
        """The composite ``[N, P, *S]``: the prediction (clamped to [-1, 1]) inside the mask, the context outside."""
        m = _check_call(context, mask, labels)
        return composite(self(context, mask, labels).clamp(-1, 1), context, m)


class AsGenerator(torch.nn.Module):
    """A baseline behind the paint generator's call, ``G(z, c, context=, mask=, labels=)``, with the attributes the
    paint metrics read (paint_channels, label_channels, img_shape, z_dim, c_dim): metrics/paint.py and
    metrics/insert_dice.py then score a baseline exactly as they score a paint snapshot (same items, masks, seeds).
    z and c are ignored (a baseline is deterministic and unconditional)."""

    def __init__(self, painter, paint_channels: list, label_channels: list, img_shape: list):
        super().__init__()
        self.painter = painter          # RingFill or UNetInpainter (a module is registered, so .to() moves it)
        self.paint_channels, self.label_channels = list(paint_channels), list(label_channels)
        self.img_shape = list(img_shape)
        self.z_dim, self.c_dim = 1, 0

    def forward(self, z, c, context=None, mask=None, labels=None, **_kwargs):  # truncation_psi, noise_mode: unused
        return self.painter.fill(context, mask, labels)


def masked_l1(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean absolute error over the voxels of the mask and the painted channels (0 for an empty mask)."""
    mf = (mask > 0.5).to(pred.dtype) if mask.dtype != torch.bool else mask.to(pred.dtype)
    return ((pred - target).abs() * mf).sum() / (mf.sum() * pred.shape[1]).clamp(min=1)


def _random_flips(tensors: list, generator: torch.Generator) -> list:
    """The same random flip per spatial axis on every tensor of the list (geometric augmentation of a batch)."""
    dims = tensors[0].ndim - 2
    flips = [2 + d for d in range(dims) if torch.rand([], generator=generator).item() < 0.5]
    return [t.flip(flips) if flips else t for t in tensors]


def train_inpainter(
    model: UNetInpainter,                   # the network to train (in place)
    images: torch.Tensor,                   # [N, P, *S] real channels in [-1, 1] (the targets)
    brain: torch.Tensor,                    # [N, 1, *S] bool brain mask
    labels: torch.Tensor,                   # [N, L, *S] one-hot tumour labels, bool or in {0, 1}
    mask_sampler,                           # (labels, brain) -> (mask [N,1,*S], labels [N,L,*S]): RepaintMasks()
    cpu_seconds: float = None,              # budget in process CPU seconds (all threads); None = steps only
    wall_seconds: float = None,             # budget in wall-clock seconds (a GPU's time); None = no such budget
    steps: int = None,                      # stop after this many steps; None = the budget only
    batch: int = 8,                         # patches per step
    lr: float = 1e-3,                       # Adam learning rate
    flips: bool = True,                     # random flips of image, brain and labels together
    seed: int = 0,                          # batch order and flips
    device='cpu',
    progress=None,                          # called as progress(step, loss, cpu_seconds) every `report` steps
    report: int = 50,
) -> dnnlib.EasyDict:
    """Adam on the L1 loss inside the repaint masks, for a CPU-time or wall-clock budget (at least one step) or a
    number of steps.

    Returns what training did: steps, cpu_seconds, wall_seconds, first and last losses (the mean of up to the first and
    last ``report`` steps) and the loss per step."""
    if cpu_seconds is None and wall_seconds is None and steps is None:
        raise BaselineError('train_inpainter needs a CPU-time or wall-clock budget, or a number of steps')
    n = images.shape[0]
    if n == 0:
        raise BaselineError('train_inpainter got no patches')
    if brain.shape[0] != n or labels.shape[0] != n:
        raise BaselineError(f'images, brain and labels disagree in count: {n}, {brain.shape[0]}, {labels.shape[0]}')
    model.to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    cpu_start, wall_start = time.process_time(), time.time()
    step = 0
    while True:
        over = (cpu_seconds is not None and time.process_time() - cpu_start >= cpu_seconds) or \
            (wall_seconds is not None and time.time() - wall_start >= wall_seconds)
        if (steps is not None and step >= steps) or (over and step > 0):
            break  # A budget run takes at least one step.
        idx = torch.randint(n, [min(batch, n)], generator=gen)
        x, b, lab = images[idx].to(device), brain[idx].to(device), labels[idx].to(device)
        if flips:
            x, b, lab = _random_flips([x, b, lab], gen)
        mask, lab_map = mask_sampler(lab.to(torch.float32), b)
        mask = mask > 0.5
        pred = model(x, mask, lab_map)
        loss = masked_l1(pred, x, mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        step += 1
        if progress is not None and step % report == 0:
            progress(step, float(np.mean(losses[-report:])), time.process_time() - cpu_start)
    model.eval()
    k = max(1, min(report, len(losses) // 2)) if losses else 1
    return dnnlib.EasyDict(steps=step, cpu_seconds=time.process_time() - cpu_start,
                           wall_seconds=time.time() - wall_start,
                           first_loss=float(np.mean(losses[:k])) if losses else None,
                           last_loss=float(np.mean(losses[-k:])) if losses else None, losses=losses)


def patch_tensors(
    path: str,                              # patch archive written by dataset_tool.py --kind patches
    subset: str = 'all',                    # 'all', 'train' or 'val': the archive's case-level split
    max_patches: int = None,                # None = every patch
) -> dnnlib.EasyDict:
    """A whole patch archive in memory, split by channel role (the archive's layout, notes in paint_spec.md).

    Returns images [N, P, *S] float32 in [-1, 1] (the painted channels), brain [N, 1, *S] bool, labels [N, L, *S]
    bool one-hot, c [N, c_dim] float32 (the archive's class labels; c_dim may be 0), types (list of 'tumour' /
    'healthy' per patch), cases, fnames, paint_channels, label_channels, spacing."""
    from training.dataset import ImageFolderDataset
    ds = ImageFolderDataset(path, subset=subset, use_labels=True, max_size=max_patches)
    names = ds.channels
    if ds.kind != 'patches' or 'brain' not in names:
        raise BaselineError(f'{path}: not a patch archive (kind {ds.kind!r}, channels {names}); make one with '
                            f'dataset_tool.py --kind patches')
    label_idx = [i for i, n in enumerate(names) if n.startswith('seg_')]
    paint_idx = [i for i, n in enumerate(names) if n != 'brain' and i not in label_idx]
    n, spatial = len(ds), list(ds.image_shape[1:])
    images = torch.empty([n, len(paint_idx)] + spatial)  # Filled item by item: no second copy of the archive.
    brain = torch.empty([n, 1] + spatial, dtype=torch.bool)
    labels = torch.empty([n, len(label_idx)] + spatial, dtype=torch.bool)
    for i in range(n):
        raw = ds[i][0]
        images[i] = torch.from_numpy(raw[paint_idx].astype(np.float32) * (2 / ds.dtype_max) - 1)
        brain[i, 0] = torch.from_numpy(raw[names.index('brain')] > ds.dtype_max / 2)
        labels[i] = torch.from_numpy(raw[label_idx] > ds.dtype_max / 2)
    records = ds.patch_info
    fnames = [ds.image_fname(i) for i in range(len(ds))]
    c = torch.from_numpy(np.stack([ds.get_label(i) for i in range(len(ds))]).astype(np.float32)) if ds.has_labels \
        else torch.zeros([len(ds), 0])
    out = dnnlib.EasyDict(images=images, brain=brain, labels=labels, c=c,
                          types=[(records.get(f) or {}).get('type', 'unknown') for f in fnames],
                          cases=[(records.get(f) or {}).get('case', ds.file_case(i)) for i, f in enumerate(fnames)],
                          fnames=fnames, paint_channels=[names[i] for i in paint_idx],
                          label_channels=[names[i] for i in label_idx], spacing=ds.describe().get('spacing'))
    ds.close()
    return out


def save_inpainter(path: str, model: UNetInpainter, training: dict = None) -> None:
    """Write ``{format, init_kwargs, state_dict, training}`` atomically (torch_utils.records; loadable with
    ``weights_only=True``)."""
    record = dict(training or {})
    record.pop('losses', None)
    records.save_record(path, INPAINTER_FORMAT, model, init_kwargs=dict(model.init_kwargs), training=record)


def load_inpainter(path: str, device='cpu') -> UNetInpainter:
    """The inpainter (eval mode, on ``device``) from a file written by `save_inpainter`."""
    data = records.load_record(path, INPAINTER_FORMAT, 'inpainter file', 'mri.painting.baselines', BaselineError)
    model = records.load_weights(UNetInpainter(**data['init_kwargs']), data, path, 'the U-Net', BaselineError)
    model.training_record = dnnlib.EasyDict(data.get('training', {}))
    return model.to(device).eval()
