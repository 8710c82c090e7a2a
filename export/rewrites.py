"""Exact rewrites applied to a module while it is traced for export; the diffusers modules are restored after.

Sub-pixel upsampling. diffusers' `Upsample2D` (every SD/SDXL UNet and VAE decoder) doubles the image by
nearest-neighbour interpolation and then applies a 3×3 convolution (padding 1) at the doubled size. Each
output pixel (2i+a, 2j+b) of that convolution reads the upsampled pixels at rows 2i+a-1 .. 2i+a+1, which
are copies of only two input rows: for a = 0, row i-1 (tap 0) and row i (taps 1 and 2); for a = 1, row i
(taps 0 and 1) and row i+1 (tap 2). The same holds for columns. So the layer equals four 2×2 convolutions
on the input, one per output phase (a, b), whose weights are sums of the 3×3 taps, interleaved (a pixel
shuffle). The zero padding of the upsampled image is zero padding of the input (top/left by 1 - a / 1 - b,
bottom/right by a / b). Multiplications per output pixel: 4·Cin instead of 9·Cin (2.25× fewer FLOPs); the
nearest-upsampled tensor is never materialised. Only the weight sums round differently: the result is the
same within fp32 rounding (the export's parity gate compares with the original module).
References: the resize-convolution of Odena et al., "Deconvolution and Checkerboard Artifacts" (2016),
https://distill.pub/2016/deconv-checkerboard/, and the sub-pixel convolution of Shi et al. (2016),
https://arxiv.org/abs/1609.05158 (pixel shuffle).

Any latent size. diffusers' UNet down-samples with a stride-2 3×3 convolution (padding 1), which maps n to
ceil(n/2); when a latent side is not a multiple of the UNet's overall factor, its forward passes each
up-sampler the size of its skip connection (`upsample_size`) and Upsample2D resizes to it (nearest) instead
of doubling. That size S is 2m or 2m - 1 for an input side m, per dimension. PyTorch's nearest resize to
S = 2m - 1 reads input row floor(i·m/S) = floor(i/2) for every i < S (i·m/S = i/2 + i/(2S), i/(2S) < 1/2;
its float32 scale keeps this for every m < 2095, i.e. latent sides up to 4188), so the resized image is the
first S rows of the doubled one. The 3×3 convolution of that crop equals the crop of the convolution of the
doubled image except in its last row, whose tap 2 reads the zero padding instead of the doubled image's
last row (a copy of input row m - 1); likewise in the last column, where the corner is then subtracted twice
(inclusion-exclusion adds it back once). So the rewrite crops the sub-pixel result to the skip size and
subtracts k = 2m - S (0 or 1, computed from the traced shapes) times each correction: the last input row
convolved along columns with kernel row 2's taps (a 1-D sub-pixel convolution), the last input column along
rows with kernel column 2's taps, and the corner tap times the corner pixel. One graph with dynamic
height/width is exact for both cases; where the size doubles, the crop keeps everything and k = 0.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F

SUBPIXEL_PASS = "sdrt.subpixel_upsample"
SKIP_SIZE_PASS = "sdrt.upsample_to_skip_size"  # every UNet up-sampler traced with its skip connection's size


def _row_phases(weight: torch.Tensor) -> list[torch.Tensor]:
    """[O, I, 3, k] → the two [O, I, 2, k] kernels of output rows 2i (taps 0 | 1+2) and 2i+1 (taps 0+1 | 2)."""
    t0, t1, t2 = weight[:, :, 0], weight[:, :, 1], weight[:, :, 2]
    return [torch.stack([t0, t1 + t2], 2), torch.stack([t0 + t1, t2], 2)]


def phase_kernels(weight: torch.Tensor) -> dict[tuple[int, int], torch.Tensor]:
    """3×3 kernel [O, I, 3, 3] → {(a, b): 2×2 kernel [O, I, 2, 2]} for output pixel (2i+a, 2j+b); sums in fp32."""
    kernels = {}
    for a, rows in enumerate(_row_phases(weight.float())):
        for b, both in enumerate(_row_phases(rows.transpose(2, 3))):
            kernels[a, b] = both.transpose(2, 3).contiguous().to(weight.dtype)
    return kernels


class _PaddedConv(torch.autograd.Function):
    """A convolution with asymmetric zero padding, exported as one ONNX Conv (its `pads` attribute) rather
    than Pad + Conv, which ONNX Runtime runs as a separate copy of the input. `bias` may be None."""

    @staticmethod
    def forward(ctx, x, weight, bias, top: int, left: int, bottom: int, right: int):
        return F.conv2d(F.pad(x, (left, right, top, bottom)), weight, bias)

    @staticmethod
    def symbolic(g, x, weight, bias, top, left, bottom, right):
        kernel = weight.type().sizes()[2:]
        none = bias is None or (hasattr(bias, "node") and bias.node().mustBeNone())
        inputs = (x, weight) if none else (x, weight, bias)
        return g.op("Conv", *inputs, kernel_shape_i=list(kernel), pads_i=[top, left, bottom, right],
                    strides_i=[1, 1], dilations_i=[1, 1], group_i=1)


def _tap_phases(t0: torch.Tensor, t1: torch.Tensor, t2: torch.Tensor, dim: int) -> list[torch.Tensor]:
    """Three taps along one axis → the two 2-tap kernels of output phases 2i (t0 | t1+t2) and 2i+1 (t0+t1 | t2)."""
    return [torch.stack([t0, t1 + t2], dim), torch.stack([t0 + t1, t2], dim)]


def _interleave(first: torch.Tensor, second: torch.Tensor, dim: int) -> torch.Tensor:
    """[..., n, ...] twice → [..., 2n, ...] with `first` at even and `second` at odd positions along dim."""
    return torch.stack([first, second], dim + 1).flatten(dim, dim + 1)


class SubpixelUpsample2D(torch.nn.Module):
    """Drop-in for an eligible `Upsample2D`: same call signature, same result (see the module docstring),
    with or without the skip connection's `output_size`."""

    def __init__(self, original: torch.nn.Module):
        super().__init__()
        self.original = original  # used for an output size that is neither 2m nor 2m - 1
        conv = original.conv
        weight = conv.weight.detach()
        for (a, b), kernel in phase_kernels(weight).items():
            self.register_buffer(f"kernel_{a}{b}", kernel)
        bias = conv.bias.detach() if conv.bias is not None else torch.zeros(conv.out_channels, dtype=conv.weight.dtype)
        self.register_buffer("bias", bias.clone())
        # Corrections for an odd output size: kernel row 2 along columns, kernel column 2 along rows, the corner.
        w = weight.float()
        for phase, kernel in enumerate(_tap_phases(*w[:, :, 2].unbind(-1), dim=-1)):  # [O, I, 2] → [O, I, 1, 2]
            self.register_buffer(f"last_row_{phase}", kernel.unsqueeze(2).to(weight.dtype))
        for phase, kernel in enumerate(_tap_phases(*w[:, :, :, 2].unbind(-1), dim=-1)):  # → [O, I, 2, 1]
            self.register_buffer(f"last_col_{phase}", kernel.unsqueeze(3).to(weight.dtype))
        self.register_buffer("corner", weight[:, :, 2:3, 2:3].clone())
        self.took_output_size = False  # set when called with the skip size (read after a trace)

    def forward(self, hidden_states, output_size=None, *args, **kwargs):
        if output_size is not None and not _odd_or_double(hidden_states, output_size):
            return self.original(hidden_states, output_size, *args, **kwargs)
        phase = {(a, b): _PaddedConv.apply(hidden_states, getattr(self, f"kernel_{a}{b}"), self.bias, 1 - a, 1 - b, a, b)
                 for a in (0, 1) for b in (0, 1)}  # [N, O, H, W] each
        # Interleave by two concatenations (the export's Unsqueeze + Concat + Reshape): ONNX Runtime's CPU
        # DepthToSpace (pixel shuffle) took 4x as long for the same copy.
        rows = [_interleave(phase[a, 0], phase[a, 1], 3) for a in (0, 1)]  # [N, O, H, 2W]: columns 2j+b
        doubled = _interleave(rows[0], rows[1], 2)  # [N, O, 2H, 2W]: rows 2i+a
        if output_size is None:
            return doubled
        self.took_output_size = True
        return self._to_size(hidden_states, doubled, output_size)

    def _to_size(self, x, doubled, output_size):
        """The doubled result cropped to output_size (S, T), with the last row/column/corner corrected where
        S = 2H - 1 / T = 2W - 1 (see the module docstring). Sizes stay traced values: one graph for both."""
        height, width = output_size[0], output_size[1]
        k = 2 * x.shape[2] - height  # 1 where the height is odd (2H - 1), 0 where it doubles
        l = 2 * x.shape[3] - width
        out = doubled[:, :, :height, :width]
        last_row, last_col = x[:, :, -1:, :], x[:, :, :, -1:]
        row = _interleave(_PaddedConv.apply(last_row, self.last_row_0, None, 0, 1, 0, 0),
                          _PaddedConv.apply(last_row, self.last_row_1, None, 0, 0, 0, 1), 3)[:, :, :, :width]
        col = _interleave(_PaddedConv.apply(last_col, self.last_col_0, None, 1, 0, 0, 0),
                          _PaddedConv.apply(last_col, self.last_col_1, None, 0, 0, 1, 0), 2)[:, :, :height]
        corner = F.conv2d(x[:, :, -1:, -1:], self.corner)  # [N, O, 1, 1]
        col = torch.cat([col[:, :, :-1], col[:, :, -1:] - k * corner], 2)  # the corner is in both corrections
        out = torch.cat([out[:, :, :-1], out[:, :, -1:] - k * row], 2)
        return torch.cat([out[:, :, :, :-1], out[:, :, :, -1:] - l * col], 3)


def _odd_or_double(x: torch.Tensor, output_size) -> bool:
    """Whether each output side is 2n or 2n - 1 of the input side n (what a UNet's skip connections give)."""
    if len(output_size) != 2:
        return False
    return all(int(2 * n - s) in (0, 1) for n, s in zip(x.shape[-2:], output_size))


def upsamplers_sized(root: torch.nn.Module) -> tuple[int, int]:
    """(rewritten up-samplers under root that were called with an output size, all up-samplers under root):
    read inside `subpixel_upsampling` after a trace. Equal and non-zero: the graph takes any latent size."""
    kept = {id(m.original) for m in root.modules() if isinstance(m, SubpixelUpsample2D)}  # inside a rewrite
    ups = [m for m in root.modules() if type(m).__name__ in ("Upsample2D", "SubpixelUpsample2D") and id(m) not in kept]
    return sum(bool(getattr(m, "took_output_size", False)) for m in ups), len(ups)


def is_subpixel_eligible(module: torch.nn.Module) -> bool:
    """diffusers' Upsample2D in its SD/SDXL form: nearest ×2, then a plain 3×3 conv with padding 1, no norm."""
    if type(module).__name__ != "Upsample2D":
        return False
    conv = getattr(module, "conv", None)
    return (getattr(module, "use_conv", False) and not getattr(module, "use_conv_transpose", True)
            and getattr(module, "interpolate", False) and getattr(module, "norm", None) is None
            and getattr(module, "name", None) == "conv" and type(conv) is torch.nn.Conv2d
            and conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.padding == (1, 1)
            and conv.dilation == (1, 1) and conv.groups == 1 and conv.padding_mode == "zeros")


@contextmanager
def subpixel_upsampling(root: torch.nn.Module):
    """Swap every eligible Upsample2D under `root` for SubpixelUpsample2D; yields how many; restores on exit."""
    swapped = []
    for parent in list(root.modules()):
        for name, child in list(parent.named_children()):
            if is_subpixel_eligible(child):
                setattr(parent, name, SubpixelUpsample2D(child))
                swapped.append((parent, name, child))
    try:
        yield len(swapped)
    finally:
        for parent, name, child in swapped:
            setattr(parent, name, child)
