"""Every weight layer as a matmul over input *rows*: Linear, HF ``Conv1D``, Conv1d/2d.

Layer-wise quantizers (GPTQ, AdaRound, AdaQuant) reason about ``Y = X W^T`` with
``W [O, K]`` and input rows ``X [n, K]``. A convolution is that matmul over im2col
patches (Chellapilla et al., 2006): for ``W [O, I/g, kh, kw]`` with ``g`` groups,
``W2 = W.reshape(O, I/g * kh * kw)`` and every output position's receptive field is one
row of ``unfold(x)`` ``[n, I * kh * kw]`` in ``(c, kh, kw)`` order. With ``g > 1`` the
row splits into ``g`` slices of ``K = I/g * kh * kw`` and output channels
``[j O/g, (j+1) O/g)`` see slice ``j`` only, so the GPTQ Hessian is block diagonal:
one ``[K, K]`` block ``2 X_j^T X_j / n`` per group (:class:`GroupedHessian`).

Padding is inferred from the layer's output size, so convs that pad inside ``forward``
(TensorFlow "same" padding, ``F.pad`` then ``conv2d``) get the patches they really
multiply: total padding ``p = (out - 1) stride + dilation (k - 1) + 1 - in``, split
``p // 2`` before and the rest after (equal to ``nn.Conv2d``'s symmetric padding when
``p`` is even).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ptq.calibration.hessian import HessianAccumulator
from ptq.frontend.quantizable import is_hf_conv1d


@dataclass(frozen=True)
class LayerGeometry:
    """How a weight layer multiplies its input.

    Attributes:
        kind: ``linear``, ``conv1d_hf`` (GPT-2 ``Conv1D``, weight ``[K, O]``) or ``conv``.
        out_features: ``O``.
        in_features: ``K`` per group (the width of ``weight_2d``).
        groups: Conv groups (1 for matmuls).
    """

    kind: str
    out_features: int
    in_features: int
    groups: int = 1


def geometry(module: nn.Module) -> LayerGeometry:
    """The :class:`LayerGeometry` of a Linear, HF ``Conv1D`` or ``nn.Conv1d/2d``.

    Raises:
        ValueError: Unsupported layer type or padding mode.
    """
    if isinstance(module, nn.Linear):
        return LayerGeometry("linear", module.out_features, module.in_features)
    if is_hf_conv1d(module):
        w = module.weight
        assert isinstance(w, torch.Tensor)
        return LayerGeometry("conv1d_hf", int(w.shape[1]), int(w.shape[0]))
    if isinstance(module, nn.Conv1d | nn.Conv2d):
        if module.padding_mode != "zeros":
            raise ValueError(
                f"layer-wise quantization supports zero-padded convs only, "
                f"got padding_mode={module.padding_mode!r}"
            )
        w = module.weight
        return LayerGeometry("conv", int(w.shape[0]), int(w[0].numel()), module.groups)
    raise ValueError(
        f"layer-wise quantization supports nn.Linear, transformers Conv1D, nn.Conv1d and "
        f"nn.Conv2d, not {type(module).__name__}"
    )


def weight_2d(module: nn.Module) -> torch.Tensor:
    """The weight as ``[O, K]`` in fp32 (a copy)."""
    w = module.weight
    assert isinstance(w, torch.Tensor)
    w = w.detach().float()
    if is_hf_conv1d(module):
        return w.t().contiguous()
    return w.reshape(w.shape[0], -1).clone()


def _same_pad(size_in: int, size_out: int, k: int, stride: int, dilation: int) -> tuple[int, int]:
    total = max((size_out - 1) * stride + dilation * (k - 1) + 1 - size_in, 0)
    return total // 2, total - total // 2


def input_rows(module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The rows ``[n, groups * K]`` the layer multiplied, from its input ``x`` and output ``y``."""
    if not isinstance(module, nn.Conv1d | nn.Conv2d):
        return x.detach().reshape(-1, x.shape[-1])
    conv2d = isinstance(module, nn.Conv2d)
    x4 = x.detach() if conv2d else x.detach().unsqueeze(-2)
    y_hw = tuple(y.shape[-2:]) if conv2d else (1, int(y.shape[-1]))
    k = tuple(module.kernel_size) if conv2d else (1, module.kernel_size[0])
    s = tuple(module.stride) if conv2d else (1, module.stride[0])
    d = tuple(module.dilation) if conv2d else (1, module.dilation[0])
    ph = _same_pad(x4.shape[-2], y_hw[0], k[0], s[0], d[0])
    pw = _same_pad(x4.shape[-1], y_hw[1], k[1], s[1], d[1])
    x4 = F.pad(x4, [pw[0], pw[1], ph[0], ph[1]])
    cols = F.unfold(x4, k, dilation=d, stride=s)  # [N, C*kh*kw, L]
    if cols.shape[-1] != y_hw[0] * y_hw[1]:
        raise ValueError(
            f"im2col of a {tuple(x.shape)} input gives {cols.shape[-1]} positions, but the "
            f"conv produced {tuple(y.shape)}"
        )
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def rows_forward(
    w2d: torch.Tensor, bias: torch.Tensor | None, rows: torch.Tensor, groups: int = 1
) -> torch.Tensor:
    """``Y = X W^T + b`` over rows, block-diagonal across ``groups``: ``[n, O]``."""
    if groups == 1:
        return F.linear(rows, w2d, bias)
    n, o = rows.shape[0], w2d.shape[0]
    xg = rows.reshape(n, groups, -1)
    wg = w2d.reshape(groups, o // groups, -1)
    y = torch.einsum("ngk,gok->ngo", xg, wg).reshape(n, o)
    return y if bias is None else y + bias


class GroupedHessian:
    """``groups`` independent Hessians ``2 X_j^T X_j / n`` [groups, K, K] (grouped convs)."""

    def __init__(self, in_features: int, groups: int) -> None:
        if in_features < 1 or groups < 2:
            raise ValueError(
                f"GroupedHessian needs in_features >= 1 and groups >= 2, got {in_features}, {groups}"
            )
        self.in_features = in_features
        self.groups = groups
        self._sum = torch.zeros(groups, in_features, in_features, dtype=torch.float64)
        self._count = 0

    @property
    def nsamples(self) -> int:
        return self._count

    def update(self, rows: torch.Tensor) -> None:
        """Add rows ``[n, groups * K]``."""
        if rows.dim() != 2 or rows.shape[1] != self.groups * self.in_features:
            raise ValueError(
                f"GroupedHessian expects rows [n, {self.groups * self.in_features}], "
                f"got {tuple(rows.shape)}"
            )
        xg = rows.detach().double().reshape(rows.shape[0], self.groups, self.in_features)
        if self._count == 0:
            self._sum = self._sum.to(xg.device)  # accumulate where the rows are (a GPU run)
        self._sum += torch.einsum("ngi,ngj->gij", xg, xg)
        self._count += rows.shape[0]

    def hessian(self) -> torch.Tensor:
        if self._count == 0:
            raise ValueError("GroupedHessian has no samples; run calibration data first")
        return self._sum * (2.0 / self._count)


def new_hessian(geo: LayerGeometry) -> HessianAccumulator | GroupedHessian:
    """The accumulator matching ``geo`` (grouped when ``groups > 1``)."""
    if geo.groups > 1:
        return GroupedHessian(geo.in_features, geo.groups)
    return HessianAccumulator(geo.in_features)
