"""Low-level ops: upfirdn2d, bias_act, conv2d_resample, conv2d_gradfix, fma, grid_sample_gradfix."""
