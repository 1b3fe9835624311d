"""Images decoded on the decrypt workers: :class:`Image` (``Loader(decode=...)``)."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence, Tuple, Union

#: torchvision's ImageNet normalization (``transforms.Normalize(mean, std)`` of its recipes).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_DTYPES = ("uint8", "float16", "bfloat16", "float32")
_CORE = {"uint8": "u8", "float16": "f16", "bfloat16": "bf16", "float32": "f32"}


def _dtype_name(dtype: Any) -> str:
    """``"float32"``, ``numpy.float32``, ``torch.float32`` -> ``"float32"``."""
    name = getattr(dtype, "__name__", None) or str(dtype)
    name = name.replace("torch.", "").replace("numpy.", "")
    aliases = {"u8": "uint8", "f16": "float16", "half": "float16", "bf16": "bfloat16", "f32": "float32", "float": "float32"}
    name = aliases.get(name, name)
    if name not in _DTYPES:
        raise ValueError(f"Image dtype must be one of {', '.join(_DTYPES)}, not {dtype!r}")
    return name


def _pair(name: str, v: Any) -> Tuple[float, float]:
    try:
        a, b = (float(x) for x in v)
    except (TypeError, ValueError):
        raise ValueError(f"Image {name} must be a pair (min, max), not {v!r}") from None
    return a, b


def _three(name: str, v: Any) -> Tuple[float, float, float]:
    try:
        t = tuple(float(x) for x in v)
    except TypeError:
        raise ValueError(f"Image {name} must be three numbers (one per RGB channel), not {v!r}") from None
    if len(t) != 3:
        raise ValueError(f"Image {name} must be three numbers (one per RGB channel), not {v!r}")
    return t  # type: ignore[return-value]


@dataclasses.dataclass(frozen=True)
class Image:
    """Decode a bytes field of JPEG, PNG or WebP images into a fixed-shape tensor, on
    the loader's decrypt workers: ``Loader(..., decode={"image": Image(224, train=True)})``.

    ``train=False`` (evaluation) is torchvision's ImageNet eval: ``Resize(resize)`` of
    the shorter side (``resize`` defaults to ``size * 8 // 7``: 256 for 224), then
    ``CenterCrop(size)``. ``train=True`` is ``RandomResizedCrop(size, scale, ratio)``
    then a horizontal flip with probability ``flip``; the randomness is a pure
    function of (seed, epoch, global sample id), so a resumed run or another worker
    count gives the same pixels. Resampling is PIL's antialiased bilinear, as
    torchvision's transforms on PIL images. Gray and palette images become RGB, alpha
    is dropped (PIL's ``convert("RGB")``), 16-bit PNGs keep their high byte and EXIF
    orientation is applied.

    The output is ``layout`` ``"CHW"`` (``[3, H, W]``, the default) or ``"HWC"``, of
    ``dtype`` ``uint8`` (default, what ``PILToTensor`` gives) or ``float32``,
    ``float16``, ``bfloat16`` scaled to [0, 1] and, with ``mean``/``std``, normalized
    (``IMAGENET_MEAN``, ``IMAGENET_STD``). An image of more than ``max_pixels``
    pixels is a :class:`shardlock.DecodeError` before it is decoded (a decompression
    bomb), as is one that is corrupt or truncated; ``Loader(on_decode_error="skip")``
    leaves such samples out instead (audited, counted in ``Loader.decode_skips``).
    """

    size: Union[int, Tuple[int, int]] = 224
    train: bool = False
    resize: Optional[int] = None
    scale: Tuple[float, float] = (0.08, 1.0)
    ratio: Tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    flip: float = 0.5
    mean: Optional[Sequence[float]] = None
    std: Optional[Sequence[float]] = None
    layout: str = "CHW"
    dtype: Any = "uint8"
    max_pixels: int = 64 << 20

    def _native(self, field: str) -> Tuple[Any, ...]:
        if isinstance(self.size, int) and not isinstance(self.size, bool):
            h = w = self.size
        else:
            try:
                h, w = (int(x) for x in self.size)  # type: ignore[union-attr]
            except (TypeError, ValueError):
                raise ValueError(f"Image size must be an int or (height, width), not {self.size!r}") from None
        if h < 1 or w < 1:
            raise ValueError(f"Image size must be positive, not {self.size!r}")
        resize = self.resize if self.resize is not None else max(h, w) * 8 // 7
        if (self.mean is None) != (self.std is None):
            raise ValueError("Image mean and std go together: give both or neither")
        normalize = None if self.mean is None else (_three("mean", self.mean), _three("std", self.std))
        layout = str(self.layout).upper()
        if layout not in ("CHW", "HWC"):
            raise ValueError(f"Image layout must be 'CHW' or 'HWC', not {self.layout!r}")
        return (str(field), (h, w), bool(self.train), int(resize), _pair("scale", self.scale),
                _pair("ratio", self.ratio), float(self.flip), normalize, layout, _CORE[_dtype_name(self.dtype)],
                int(self.max_pixels))
