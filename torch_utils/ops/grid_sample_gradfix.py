"""grid_sample (bilinear, zero padding, align_corners=False) that is twice differentiable w.r.t. its input.

The ADA augmentation pipeline (Karras et al., "Training Generative Adversarial Networks with Limited Data",
NeurIPS 2020, App. B) resamples the discriminator's input with grid_sample; R1 then differentiates the
gradient of D w.r.t. the *un*augmented images, so the backward of grid_sample must itself be
differentiable. The input gradient is linear in the output gradient (it is the adjoint S^T of the sampling
map S), so its own gradient is S again: a plain grid_sample of the incoming second-order gradient.
"""

import torch
import torch.nn.functional as F

enabled = True  # False = plain F.grid_sample.

_HAS_BACKWARD_OP = hasattr(torch.ops.aten, 'grid_sampler_2d_backward')
_BILINEAR, _ZEROS = 0, 0  # aten's enum values for mode='bilinear' and padding_mode='zeros'.


def grid_sample(
    input,      # [N, C, H_in, W_in].
    grid,       # [N, H_out, W_out, 2], coordinates in [-1, 1] (x, y).
):
    """Same result as F.grid_sample(input, grid, 'bilinear', 'zeros', align_corners=False)."""
    if not (enabled and _HAS_BACKWARD_OP):
        return F.grid_sample(input, grid, mode='bilinear', padding_mode='zeros', align_corners=False)
    return _GridSample2d.apply(input, grid)


class _GridSample2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, grid):
        assert input.ndim == 4 and grid.ndim == 4 and grid.shape[-1] == 2, \
            f'grid_sample_gradfix: need input [N, C, H, W] and grid [N, H, W, 2], got {tuple(input.shape)}, {tuple(grid.shape)}'
        ctx.save_for_backward(input, grid)
        return F.grid_sample(input, grid, mode='bilinear', padding_mode='zeros', align_corners=False)

    @staticmethod
    def backward(ctx, grad_output):
        input, grid = ctx.saved_tensors
        return _GridSample2dBackward.apply(grad_output, input, grid, ctx.needs_input_grad[0], ctx.needs_input_grad[1])


class _GridSample2dBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, grad_output, input, grid, need_input, need_grid):
        grad_input, grad_grid = torch.ops.aten.grid_sampler_2d_backward(
            grad_output, input, grid, _BILINEAR, _ZEROS, False, [need_input, need_grid])
        ctx.save_for_backward(grid)
        ctx.set_materialize_grads(False)  # An unused output then arrives as None, not as zeros.
        return grad_input, grad_grid

    @staticmethod
    def backward(ctx, gg_input, gg_grid):
        grid, = ctx.saved_tensors
        if gg_grid is not None:
            raise NotImplementedError('grid_sample_gradfix: second-order gradients through the grid gradient are not supported')
        d_grad_output = None
        if ctx.needs_input_grad[0] and gg_input is not None:
            # grad_input = S^T grad_output, so d<gg, grad_input>/d grad_output = S gg.
            d_grad_output = _GridSample2d.apply(gg_input, grid)
        # grad_input does not depend on the input's values (the map is linear), hence None for `input`;
        # its dependence on the grid is not provided (the ADA grid is never a leaf that needs gradients).
        return d_grad_output, None, None, None, None
