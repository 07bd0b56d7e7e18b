"""``--device auto|cpu|cuda|cuda:N``: where the runner's current unit and activations live."""

from __future__ import annotations

import torch

from ptq.errors import PtqUsageError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_HELP = (
    "What the blocks are loaded and run in: auto (float32 on the CPU, the checkpoint's "
    "own dtype on CUDA), float32, bfloat16, float16. Hessians and the rounding maths are "
    "float32 either way."
)
DEVICE_HELP = (
    "Where the current block, its calibration activations and the Hessians live: auto "
    "(CUDA when present), cpu, cuda, cuda:N; everything else stays on the host."
)


def resolve_device(
    spec: str | torch.device = "auto", local_rank: int | None = None
) -> torch.device:
    """The device for ``spec``; under ``torchrun`` ``cuda`` means this rank's GPU.

    Raises:
        PtqUsageError: An unknown spelling, or CUDA asked for where there is none.
    """
    text = str(spec).strip().lower()
    if text == "auto":
        text = "cuda" if torch.cuda.is_available() else "cpu"
    if text == "cpu":
        return torch.device("cpu")
    if text == "cuda" or text.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise PtqUsageError(
                f"--device {spec}: this machine has no CUDA device (torch "
                f"{torch.__version__}); use --device cpu"
            )
        index = int(text.partition(":")[2]) if ":" in text else (local_rank or 0)
        if not 0 <= index < torch.cuda.device_count():
            raise PtqUsageError(
                f"--device {spec}: there are {torch.cuda.device_count()} CUDA device(s)"
            )
        return torch.device("cuda", index)
    raise PtqUsageError(f"--device {spec}: choose auto, cpu, cuda or cuda:N")


def resolve_dtype(spec: str, device: torch.device, stored: torch.dtype) -> torch.dtype:
    """The compute dtype for ``spec`` (``auto``: float32 on the CPU, ``stored`` on CUDA).

    Raises:
        PtqUsageError: An unknown spelling.
    """
    if spec == "auto":
        return stored if device.type == "cuda" else torch.float32
    if spec not in DTYPES:
        raise PtqUsageError(f"--dtype {spec}: choose auto, {', '.join(DTYPES)}")
    return DTYPES[spec]
