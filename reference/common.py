"""Shared helpers for the xsam reference fixture generators.

Everything here is plain numpy / PIL / torch; no network, no hub downloads.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

REPO_ROOT = Path(__file__).resolve().parent.parent
FIXTURES = REPO_ROOT / "tests" / "fixtures"

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)
# xtuner expand2square background: tuple(int(x * 255) for x in image_mean) with mean 0.5 -> 127
SIGLIP_PAD_FILL = (127, 127, 127)

PIL_FILTERS = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}


def setup_torch() -> None:
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    torch.use_deterministic_algorithms(True)


# ----------------------------------------------------------------------------------------------
# procedural images


def make_image(h: int, w: int, seed: int) -> np.ndarray:
    """A deterministic RGB uint8 image [h, w, 3]: gradients, a disk, a rectangle, stripes and noise.

    Mixed low- and high-frequency content so that resampling differences show up.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    fy = yy / max(h - 1, 1)
    fx = xx / max(w - 1, 1)
    r = 255.0 * fx
    g = 255.0 * fy
    b = 127.5 + 127.5 * np.sin(2.0 * np.pi * (fx * 3.0 + fy * 1.5))
    img = np.stack([r, g, b], axis=-1)
    # a disk
    cy, cx = rng.uniform(0.3, 0.7) * h, rng.uniform(0.3, 0.7) * w
    rad = 0.25 * min(h, w) + 1.0
    disk = (yy - cy) ** 2 + (xx - cx) ** 2 <= rad**2
    img[disk] = rng.uniform(0, 255, size=3)
    # a rectangle
    y0, x0 = int(rng.integers(0, max(1, h // 2))), int(rng.integers(0, max(1, w // 2)))
    y1, x1 = min(h, y0 + max(1, h // 3)), min(w, x0 + max(1, w // 4))
    img[y0:y1, x0:x1] = rng.uniform(0, 255, size=3)
    # thin stripes (high frequency) in the bottom-right quadrant
    stripes = ((xx.astype(np.int64) // 2) % 2 == 0) & (yy > h / 2) & (xx > w / 2)
    img[stripes] = 255.0 - img[stripes]
    # noise
    img = img + rng.normal(0.0, 12.0, size=img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def make_mask(h: int, w: int, seed: int) -> np.ndarray:
    """A single-channel uint8 prompt mask [h, w] with a few nonzero blobs (values 0 or 1..255)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    m = np.zeros((h, w), dtype=np.uint8)
    for _ in range(3):
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        ry, rx = rng.uniform(1, h / 3 + 1), rng.uniform(1, w / 3 + 1)
        m[((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0] = int(rng.integers(1, 256))
    return m


# ----------------------------------------------------------------------------------------------
# X-SAM preprocessing, done with PIL on uint8 exactly as the HF image processors do


def sam_scaled_size(h0: int, w0: int, target: int) -> tuple[int, int]:
    """Longest side to `target`, round-half-up (X-SAM image_processing_sam._get_preprocess_shape)."""
    scale = target * 1.0 / max(h0, w0)
    newh, neww = h0 * scale, w0 * scale
    return int(newh + 0.5), int(neww + 0.5)


def pil_resize(arr: np.ndarray, size_hw: tuple[int, int], filt: str) -> np.ndarray:
    """PIL resize on 8-bit data (antialiased convolution for bilinear/bicubic). `size_hw` = (h, w)."""
    mode = "RGB" if arr.ndim == 3 else "L"
    im = Image.fromarray(arr, mode)
    out = im.resize((size_hw[1], size_hw[0]), resample=PIL_FILTERS[filt])
    return np.asarray(out, dtype=np.uint8).copy()


def expand2square(arr: np.ndarray, fill=SIGLIP_PAD_FILL) -> np.ndarray:
    """xtuner expand2square: centered paste on a square canvas of side max(h, w), offset (side - h)//2."""
    h, w = arr.shape[:2]
    if h == w:
        return arr.copy()
    im = Image.fromarray(arr, "RGB")
    side = max(h, w)
    canvas = Image.new("RGB", (side, side), tuple(fill))
    if w > h:
        canvas.paste(im, (0, (w - h) // 2))
    else:
        canvas.paste(im, ((h - w) // 2, 0))
    return np.asarray(canvas, dtype=np.uint8).copy()


def rescale_normalize(arr_u8: np.ndarray, mean, std) -> np.ndarray:
    """HF image_transforms: rescale in float64 then cast to float32; normalize in float32. Returns CHW f32."""
    x = (arr_u8.astype(np.float64) * (1.0 / 255.0)).astype(np.float32)
    mean = np.asarray(mean, dtype=np.float32)
    std = np.asarray(std, dtype=np.float32)
    x = (x - mean) / std
    return np.ascontiguousarray(x.transpose(2, 0, 1)).astype(np.float32)


def sam_preprocess(img: np.ndarray, image_size: int):
    """Returns (resized uint8 [newh,neww,3], pixel_values f32 [1,3,S,S], (newh, neww))."""
    h0, w0 = img.shape[:2]
    newh, neww = sam_scaled_size(h0, w0, image_size)
    resized = pil_resize(img, (newh, neww), "bilinear")
    norm = rescale_normalize(resized, IMAGENET_MEAN, IMAGENET_STD)
    px = np.zeros((1, 3, image_size, image_size), dtype=np.float32)  # zero pad AFTER normalisation
    px[0, :, :newh, :neww] = norm
    return resized, px, (newh, neww)


def siglip_preprocess(img: np.ndarray, image_size: int, resample: str = "bilinear"):
    """Returns (square uint8 [side,side,3], resized uint8 [V,V,3], pixel_values f32 [1,3,V,V])."""
    sq = expand2square(img)
    resized = pil_resize(sq, (image_size, image_size), resample)
    px = rescale_normalize(resized, SIGLIP_MEAN, SIGLIP_STD)[None]
    return sq, resized, px


def sam_prompt_mask(mask: np.ndarray, image_size: int):
    """Prompt mask path: NEAREST resize of the 8-bit grey mask to the SAM scaled size, zero pad."""
    h0, w0 = mask.shape
    newh, neww = sam_scaled_size(h0, w0, image_size)
    resized = pil_resize(mask, (newh, neww), "nearest")
    padded = np.zeros((image_size, image_size), dtype=np.uint8)
    padded[:newh, :neww] = resized
    return resized, padded


# ----------------------------------------------------------------------------------------------
# weights


def perturb_module_params(model: torch.nn.Module, seed: int, overrides=None) -> None:
    """Re-initialise every parameter with seeded values that exercise the math.

    * Linear / conv weights: N(0, 1/fan_in) so that activations and attention logits are O(1)
      (HF's own init uses std 0.02 or 1e-10, which makes attention nearly uniform and tests little).
    * biases: N(0, 0.1^2)
    * LayerNorm / RMSNorm weights: 1 + N(0, 0.2^2); LayerNorm biases N(0, 0.1^2)
    * SAM rel_pos tables, pos_embed, position embeddings: explicit scales (see overrides)
    Parameters are visited in sorted-name order with one torch.Generator so the result is reproducible.
    `overrides(name, param, gen) -> tensor or None` can replace the rule for a parameter.
    """
    gen = torch.Generator().manual_seed(seed)
    named = dict(model.named_parameters())
    norm_names = set()
    for mname, mod in model.named_modules():
        cls = type(mod).__name__
        if isinstance(mod, torch.nn.LayerNorm) or "LayerNorm" in cls or "RMSNorm" in cls:
            for pname, _ in mod.named_parameters(recurse=False):
                norm_names.add(f"{mname}.{pname}" if mname else pname)
    with torch.no_grad():
        for name in sorted(named):
            p = named[name]
            new = overrides(name, p, gen) if overrides is not None else None
            if new is None:
                if name in norm_names:
                    if name.endswith("weight"):
                        new = 1.0 + 0.2 * torch.randn(p.shape, generator=gen)
                    else:
                        new = 0.1 * torch.randn(p.shape, generator=gen)
                elif name.endswith("bias"):
                    new = 0.1 * torch.randn(p.shape, generator=gen)
                elif p.ndim >= 2:
                    fan_in = int(np.prod(p.shape[1:]))
                    new = torch.randn(p.shape, generator=gen) / np.sqrt(fan_in)
                else:
                    new = 0.1 * torch.randn(p.shape, generator=gen)
            p.copy_(new.to(p.dtype))


def rel_err(a, b) -> float:
    a = torch.as_tensor(a).detach().to(torch.float64)
    b = torch.as_tensor(b).detach().to(torch.float64)
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


# ----------------------------------------------------------------------------------------------
# output


def to_tensor(x) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().contiguous()
    arr = np.ascontiguousarray(x)
    return torch.from_numpy(arr.copy())


def write_fixture(stem: str, tensors: dict, meta: dict) -> Path:
    """Writes tests/fixtures/{stem}.safetensors (metadata key 'json' = the sidecar) and {stem}.json."""
    FIXTURES.mkdir(parents=True, exist_ok=True)
    out = {k: to_tensor(v) for k, v in tensors.items()}
    meta_s = json.dumps(meta, sort_keys=True)
    path = FIXTURES / f"{stem}.safetensors"
    save_file(out, str(path), metadata={"json": meta_s})
    listing = {k: {"dtype": str(v.dtype).replace("torch.", ""), "shape": list(v.shape)} for k, v in sorted(out.items())}
    side = dict(meta)
    side["tensors"] = listing
    (FIXTURES / f"{stem}.json").write_text(json.dumps(side, indent=1, sort_keys=True) + "\n")
    return path
