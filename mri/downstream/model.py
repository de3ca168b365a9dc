"""The segmentation network (MONAI U-Net or SegResNet, 2D or 3D through ``spatial_dims``), its checkpoint, inference.

U-Net: Ronneberger et al., MICCAI 2015, with MONAI's residual units (Kerfoot et al., 2018). SegResNet: Myronenko,
"3D MRI brain tumor segmentation using autoencoder regularization", BrainLes 2018 (BraTS 2018 winner).
The network predicts the four BraTS labels 0-3 (softmax); regions are scored from the label map.

A segmenter checkpoint is plain data (architecture name, its arguments, input channel names, patch, state_dict),
loaded with ``torch.load(weights_only=True)`` and rebuilt only from the two MONAI classes named here.
"""

import torch

import dnnlib
from torch_utils import records
from mri.downstream.data import SegmentationError

SEGMENTER_FORMAT = 'mri-gan-segmenter/1'
ARCHS = ('unet', 'segresnet')
NUM_LABELS = 4  # background + NETC, SNFH, ET


def build_segmenter(
    arch: str,              # 'unet' or 'segresnet'
    spatial_dims: int,      # 2 for slices, 3 for volumes
    in_channels: int,       # input image channels (modalities)
    features: int = 16,     # channels of the first level; doubled per level
    levels: int = 4,        # resolution levels (U-Net: strides of 2 between them)
) -> torch.nn.Module:
    from monai.networks import nets
    if arch == 'unet':
        return nets.UNet(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=NUM_LABELS,
                         channels=tuple(features * 2 ** i for i in range(levels)), strides=(2,) * (levels - 1),
                         num_res_units=2, norm='instance')
    if arch == 'segresnet':
        blocks = (1, 2, 2, 4, 4, 4)[:levels]
        return nets.SegResNet(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=NUM_LABELS,
                              init_filters=features, blocks_down=blocks, blocks_up=(1,) * (levels - 1))
    raise SegmentationError(f'unknown architecture {arch!r}; expected one of {", ".join(ARCHS)}')


def min_size(levels: int) -> int:
    """The multiple a patch side must be for ``levels`` levels (the bottleneck must keep at least 2 voxels per axis,
    so a side is also at least twice this)."""
    return 2 ** (levels - 1)


def save_segmenter(path: str, model: torch.nn.Module, spec: dict) -> None:
    """Write ``{format, spec, state_dict}`` atomically (torch_utils.records); ``spec`` holds arch, spatial_dims,
    in_channels, input_names, ..."""
    records.save_record(path, SEGMENTER_FORMAT, model, spec=dict(spec))


def load_segmenter(path: str, device='cpu') -> tuple:
    """``(model in eval mode on device, spec)`` from a checkpoint written by `save_segmenter`."""
    data = records.load_record(path, SEGMENTER_FORMAT, 'segmenter checkpoint', 'calc_segmentation.py',
                               SegmentationError)
    spec = dnnlib.EasyDict(data['spec'])
    model = build_segmenter(spec.arch, spec.spatial_dims, spec.in_channels, spec.features, spec.levels)
    records.load_weights(model, data, path, spec.arch, SegmentationError)
    return model.to(device).eval(), spec


@torch.no_grad()
def predict_labels(
    model: torch.nn.Module, # segmenter (eval mode)
    images: torch.Tensor,   # [N, C, *spatial] in [-1, 1]
    patch: list,            # sliding-window size per spatial axis
    sw_batch: int = 8,      # windows per forward pass
) -> torch.Tensor:
    """Label map ``[N, *spatial]`` (0-3) by MONAI sliding-window inference with Gaussian blending of the windows."""
    from monai.inferers import sliding_window_inference
    spatial = list(images.shape[2:])
    roi = [min(p, s) for p, s in zip(patch, spatial)]
    if roi == spatial:
        logits = model(images)
    else:
        logits = sliding_window_inference(images, roi_size=roi, sw_batch_size=sw_batch, predictor=model, overlap=0.5,
                                          mode='gaussian')
    return logits.argmax(dim=1)


class MaskScorer:
    """What the ``mask_dice`` metric needs from MRI, reached by name (metrics/ does not import mri/): a trained
    segmenter, the channel layout it expects, and the BraTS regions and labels to score."""

    CLASSES = {'wt': (1, 2, 3), 'tc': (1, 3), 'et': (3,), 'netc': (1,), 'snfh': (2,)}  # regions, then single labels

    def __init__(self, path: str, device='cpu'):
        self.model, self.spec = load_segmenter(path, device)
        self.path = path
        self.device = device

    def split(self, images: torch.Tensor, channel_names: list) -> tuple:
        """Generated ``[N, C, *spatial]`` -> (segmenter inputs ``[N, C_in, *spatial]``, mask label map ``[N, *spatial]``)."""
        from mri.seg import SEG_CHANNELS, decode_seg
        names = list(channel_names)
        missing = [n for n in list(self.spec.input_names) + list(SEG_CHANNELS) if n not in names]
        from metrics.metric_utils import MetricError
        if missing:
            raise MetricError(f'{self.path}: the generated images lack channels {missing} (they have {names}); '
                                    f'mask_dice needs a joint image+mask generator with the segmenter\'s inputs '
                                    f'{list(self.spec.input_names)}')
        if images.ndim - 2 != self.spec.spatial_dims:
            raise MetricError(f'{self.path}: segments {self.spec.spatial_dims}D images; the generator makes '
                                    f'{images.ndim - 2}D ones')
        inputs = images[:, [names.index(n) for n in self.spec.input_names]].clamp(-1, 1)
        return inputs, decode_seg(images[:, [names.index(s) for s in SEG_CHANNELS]], axis=1)

    def segment(self, inputs: torch.Tensor) -> torch.Tensor:
        return predict_labels(self.model, inputs.to(self.device), self.spec.patch)


def load_mask_scorer(path: str, device='cpu') -> MaskScorer:
    """The ``mask_dice`` entry point; bad input comes back as the metrics' own error type."""
    from metrics.metric_utils import MetricError
    try:
        return MaskScorer(path, device)
    except SegmentationError as err:
        raise MetricError(str(err)) from None
