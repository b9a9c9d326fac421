"""The 15 ImageNet-C / CIFAR-10-C corruptions, in torch and numpy, for small images.

Hendrycks & Dietterich (2019) define them with Wand/ImageMagick, scikit-image
and photographs of frost; here each is re-implemented on ``N x C x H x W``
batches in ``[0, 1]`` so a continual test-time-adaptation stream (CoTTA/ViDA
protocol) can be built offline from any image data. Parameters follow the
originals where they are pixel-free (noise levels, contrast, JPEG quality) and
are rescaled for 28 x 28 grayscale where they are spatial (blur radii,
displacements), then scaled again by ``min(H, W) / 28`` for other sizes. They
are "in the spirit of" the originals, not bit-compatible with CIFAR-10-C.

`corrupt(x, name, severity, seed)` is deterministic given the seed; every
random draw comes from one ``numpy.random.Generator``.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

COTTA_ORDER: tuple[str, ...] = (
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "defocus_blur",
    "glass_blur",
    "motion_blur",
    "zoom_blur",
    "snow",
    "frost",
    "fog",
    "brightness",
    "contrast",
    "elastic_transform",
    "pixelate",
    "jpeg_compression",
)

Corruption = Callable[[torch.Tensor, int, np.random.Generator], torch.Tensor]


# --------------------------------------------------------------------------- helpers


def _scale(x: torch.Tensor) -> float:
    """Spatial parameters are given for 28 x 28 images; rescale them to this size."""
    return min(x.shape[-2:]) / 28.0


def _randn(rng: np.random.Generator, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.from_numpy(rng.standard_normal(shape, dtype=np.float32))


def _conv_each(x: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """Convolve image n with kernels[n] (N x k x k, or 1 x k x k for all), each channel alike."""
    n, c, h, w = x.shape
    k = kernels.shape[-1]
    pad = k // 2
    kernels = kernels.expand(n, k, k) if kernels.shape[0] == 1 else kernels
    weight = kernels.repeat_interleave(c, dim=0).unsqueeze(1)  # (N*C, 1, k, k)
    xp = F.pad(x.reshape(1, n * c, h, w), (pad, pad, pad, pad), mode="replicate")
    return F.conv2d(xp, weight.to(x.dtype), groups=n * c).reshape(n, c, h, w)


def _gauss_kernel(sigma: float) -> torch.Tensor:
    r = max(1, math.ceil(3 * sigma))
    t = torch.arange(-r, r + 1, dtype=torch.float32)
    g = torch.exp(-(t**2) / (2 * sigma**2))
    k2 = torch.outer(g, g)
    return (k2 / k2.sum()).unsqueeze(0)


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    return x if sigma <= 0 else _conv_each(x, _gauss_kernel(sigma))


def _motion_kernels(n: int, radius: float, sigma: float, angles_deg: np.ndarray) -> torch.Tensor:
    """One-sided Gaussian-weighted line kernels (ImageMagick's -motion-blur), one per angle."""
    r = max(1, int(math.ceil(radius)))
    k = 2 * r + 1
    t = np.arange(0, r + 1, dtype=np.float64)
    w = np.exp(-(t**2) / (2 * max(sigma, 1e-3) ** 2))
    th = np.deg2rad(angles_deg)[:, None]
    px, py = t[None] * np.cos(th), t[None] * np.sin(th)  # (n, r+1), offsets from the centre
    grid = np.arange(k) - r
    wx = np.clip(1 - np.abs(px[:, :, None] - grid[None, None]), 0, None)  # (n, r+1, k)
    wy = np.clip(1 - np.abs(py[:, :, None] - grid[None, None]), 0, None)
    ker = np.einsum("t,ntj,nti->nij", w, wx, wy)
    ker /= ker.sum(axis=(1, 2), keepdims=True)
    return torch.from_numpy(ker.astype(np.float32))


def _zoom(x: torch.Tensor, z: float) -> torch.Tensor:
    """Zoom into the centre by factor z (>= 1), keeping the size (scipy's clipped_zoom)."""
    n = x.shape[0]
    theta = torch.tensor([[1 / z, 0, 0], [0, 1 / z, 0]], dtype=x.dtype).expand(n, 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _fractal(rng: np.random.Generator, n: int, h: int, w: int, decay: float) -> torch.Tensor:
    """Multi-octave value noise in [0, 1], amplitude / decay per octave.

    Stands in for the diamond-square "plasma fractal" of the originals: same
    role of ``decay`` (larger = smoother), computed on the whole batch at once.
    """
    size = max(h, w)
    out = torch.zeros(n, 1, size, size)
    amp = 1.0
    for k in range(1, max(2, math.ceil(math.log2(size))) + 1):
        g = 2**k + 1
        coarse = torch.from_numpy(rng.uniform(-1, 1, (n, 1, g, g)).astype(np.float32))
        out += amp * F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=True)
        amp /= decay
    out = out[:, :, :h, :w]
    lo = out.amin(dim=(1, 2, 3), keepdim=True)
    hi = out.amax(dim=(1, 2, 3), keepdim=True)
    return (out - lo) / (hi - lo).clamp_min(1e-8)


def _gray(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] == 3:
        wts = torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype).view(1, 3, 1, 1)
        return (x * wts).sum(1, keepdim=True).expand_as(x)
    return x


# --------------------------------------------------------------------------- noise


def gaussian_noise(x: torch.Tensor, severity: int, rng: np.random.Generator) -> torch.Tensor:
    """Additive N(0, c^2) noise, c from ImageNet-C."""
    c = (0.08, 0.12, 0.18, 0.26, 0.38)[severity - 1]
    return x + c * _randn(rng, tuple(x.shape))


def shot_noise(x: torch.Tensor, severity: int, rng: np.random.Generator) -> torch.Tensor:
    """Poisson (photon) noise: Poisson(x * c) / c, c from ImageNet-C."""
    c = (60, 25, 12, 5, 3)[severity - 1]
    return torch.from_numpy(rng.poisson(x.numpy() * c).astype(np.float32) / c)


def impulse_noise(x: torch.Tensor, severity: int, rng: np.random.Generator) -> torch.Tensor:
    """Salt-and-pepper noise on a fraction c of the values, half salt, half pepper."""
    c = (0.03, 0.06, 0.09, 0.17, 0.27)[severity - 1]
    u = torch.from_numpy(rng.random(tuple(x.shape), dtype=np.float32))
    out = x.clone()
    out[u < c / 2] = 0.0
    out[(u >= c / 2) & (u < c)] = 1.0
    return out


# --------------------------------------------------------------------------- blur


def defocus_blur(x: torch.Tensor, severity: int, rng: np.random.Generator) -> torch.Tensor:
    """Anti-aliased disk kernel (radius in pixels at 28 x 28) then a small Gaussian."""
    radius, alias = ((0.6, 0.4), (0.9, 0.5), (1.2, 0.5), (1.6, 0.5), (2.0, 0.5))[severity - 1]
    radius, alias = radius * _scale(x), alias * _scale(x)
    r = max(1, math.ceil(radius + 0.5))
    t = torch.arange(-r, r + 1, dtype=torch.float32)
    dist = torch.sqrt(t[:, None] ** 2 + t[None, :] ** 2)
    disk = (radius + 0.5 - dist).clamp(0, 1)
    return _blur(_conv_each(x, (disk / disk.sum()).unsqueeze(0)), alias)


def glass_blur(x: torch.Tensor, severity: int, rng: np.random.Generator) -> torch.Tensor:
    """Blur, locally scramble pixels within +-delta, blur again (repeated `iterations` times).

    The original swaps pixel pairs in a sequential Python loop; we gather each
    pixel from a random neighbour at once (vectorised, same visual effect).
    """
    sigma, delta, iters = ((0.3, 1, 1), (0.4, 1, 1), (0.5, 1, 2), (0.5, 2, 1), (0.6, 2, 2))[
        severity - 1
    ]
    sigma = sigma * _scale(x)
    delta = max(1, round(delta * _scale(x)))
    n, c, h, w = x.shape
    out = _blur(x, sigma)
    rows = torch.arange(h).view(1, h, 1)
    cols = torch.arange(w).view(1, 1, w)
    for _ in range(iters):
        dy = torch.from_numpy(rng.integers(-delta, delta + 1, (n, h, w)))
        dx = torch.from_numpy(rng.integers(-delta, delta + 1, (n, h, w)))
        src = (rows + dy).clamp(0, h - 1) * w + (cols + dx).clamp(0, w - 1)  # (n, h, w)
        flat = out.reshape(n, c, h * w)
        out = flat.gather(2, src.reshape(n, 1, h * w).expand(n, c, h * w)).reshape(n, c, h, w)
        out = _blur(out, sigma)
    return out


def motion_blur(x: torch.Tensor, severity: int, rng: np.random.Generator) -> torch.Tensor:
    """Gaussian-weighted one-sided line blur at a random angle in [-45, 45] degrees per image."""
    sigma = (1.0, 1.5, 2.0, 2.5, 3.0)[severity - 1] * _scale(x)
    angles = rng.uniform(-45, 45, x.shape[0])
    return _conv_each(x, _motion_kernels(x.shape[0], 3 * sigma, sigma, angles))


def zoom_blur(x: torch.Tensor, severity: int, rng: np.random.Generator) -> torch.Tensor:
    """Average of the image and centre zooms of it (ImageNet-C zoom factors)."""
    stop, step = ((1.11, 0.01), (1.16, 0.01), (1.21, 0.02), (1.26, 0.02), (1.31, 0.03))[
        severity - 1
    ]
    zooms = np.arange(1.0, stop, step)[1:]
    out = x.clone()
    for z in zooms:
        out += _zoom(x, float(z))
    return out / (len(zooms) + 1)


# --------------------------------------------------------------------------- weather


def snow(x: torch.Tensor, severity: int, rng: np.random.Generator) -> torch.Tensor:
    """Thresholded Gaussian flakes, zoomed and motion-blurred into streaks, over a brightened image.

    CIFAR-10-C parameters (loc, scale, zoom, threshold, blur radius, blur sigma, mix),
    blur lengths rescaled to 28 x 28.
    """
    loc, scale, zoom, thr, radius, sigma, mix = (
        (0.1, 0.2, 1.0, 0.6, 8, 3, 0.95),
        (0.1, 0.2, 1.0, 0.5, 10, 4, 0.9),
        (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
        (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85),
        (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8),
    )[severity - 1]
    n, _, h, w = x.shape
    s = _scale(x) * 28 / 32
    layer = loc + scale * _randn(rng, (n, 1, h, w))
    layer = _zoom(layer, zoom) if zoom > 1 else layer
    layer = torch.where(layer < thr, torch.zeros_like(layer), layer)
    layer = _conv_each(layer, _motion_kernels(n, radius * s, sigma * s, rng.uniform(-135, -45, n)))
    base = mix * x + (1 - mix) * torch.maximum(x, _gray(x) * 1.5 + 0.5)
    return base + layer + torch.rot90(layer, 2, dims=(2, 3))


def _frost_texture(rng: np.random.Generator, n: int, h: int, w: int) -> torch.Tensor:
    """Procedural frost: a fractal haze plus crystal needles (sparse seeds streaked at 3 angles)."""
    haze = _fractal(rng, n, h, w, decay=1.6)
    needles = torch.zeros(n, 1, h, w)
    r = max(2.0, 4 * min(h, w) / 28)
    for _ in range(3):
        seeds = torch.from_numpy((rng.random((n, 1, h, w)) < 0.04).astype(np.float32))
        needles += _conv_each(seeds, _motion_kernels(n, r, r, rng.uniform(0, 360, n)))
    needles = needles / needles.amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-8)
    return (0.6 * haze + 0.8 * needles).clamp(0, 1)


def frost(x: torch.Tensor, severity: int, rng: np.random.Generator) -> torch.Tensor:
    """c0 * x + c1 * frost (CIFAR-10-C weights).

    The original overlays crops of six frost photographs shipped with the
    benchmark; we have no such files offline, so the frost layer is procedural
    (`_frost_texture`): similar brightness and texture, not the same images.
    """
    c0, c1 = ((1.0, 0.2), (1.0, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45))[severity - 1]
    n, c, h, w = x.shape
    return c0 * x + c1 * _frost_texture(rng, n, h, w).expand(n, c, h, w)


def fog(x: torch.Tensor, severity: int, rng: np.random.Generator) -> torch.Tensor:
    """Add c0 * fractal haze (smoothness c1), then rescale by max / (max + c0) (CIFAR-10-C)."""
    c0, c1 = ((0.2, 3.0), (0.5, 3.0), (0.75, 2.5), (1.0, 2.0), (1.5, 1.75))[severity - 1]
    n, c, h, w = x.shape
    mx = x.amax(dim=(1, 2, 3), keepdim=True)
    out = x + c0 * _fractal(rng, n, h, w, decay=c1).expand(n, c, h, w)
    return out * mx / (mx + c0)


# --------------------------------------------------------------------------- digital


def brightness(x: torch.Tensor, severity: int, rng: np.random.Generator) -> torch.Tensor:
    """Add c to the HSV value channel (for grayscale: to the pixel), keeping hue and saturation."""
    c = (0.1, 0.2, 0.3, 0.4, 0.5)[severity - 1]
    v = x.amax(dim=1, keepdim=True)
    new_v = (v + c).clamp(max=1.0)
    # With hue and saturation fixed, RGB scales with V; black pixels become grey c.
    return torch.where(v > 0, x * new_v / v.clamp_min(1e-8), new_v.expand_as(x))


def contrast(x: torch.Tensor, severity: int, rng: np.random.Generator) -> torch.Tensor:
    """Shrink towards the per-image mean by factor c (ImageNet-C)."""
    c = (0.4, 0.3, 0.2, 0.1, 0.05)[severity - 1]
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * c + mean


def elastic_transform(x: torch.Tensor, severity: int, rng: np.random.Generator) -> torch.Tensor:
    """Random affine jitter plus a smooth random displacement field (Simard et al.).

    Parameters (displacement std alpha in pixels, field smoothness sigma in pixels,
    affine jitter as a fraction of the size) are ours, chosen for 28 x 28 digits.
    """
    alpha, sigma, aff = (
        (0.6, 3.5, 0.02),
        (0.9, 3.5, 0.03),
        (1.2, 3.5, 0.04),
        (1.5, 3.5, 0.05),
        (1.8, 3.5, 0.06),
    )[severity - 1]
    n, _, h, w = x.shape
    s = _scale(x)
    theta = torch.eye(2, 3).repeat(n, 1, 1)
    theta[:, :, :2] += torch.from_numpy(
        rng.uniform(-2 * aff, 2 * aff, (n, 2, 2)).astype(np.float32)
    )
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    field = _blur(_randn(rng, (n, 2, h, w)), sigma * s)
    field = field / field.std(dim=(2, 3), keepdim=True).clamp_min(1e-8)
    scale = torch.tensor([2.0 / w, 2.0 / h]).view(1, 1, 1, 2)  # pixels -> grid units
    grid = grid + alpha * s * field.permute(0, 2, 3, 1) * scale
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def pixelate(x: torch.Tensor, severity: int, rng: np.random.Generator) -> torch.Tensor:
    """Box-downsample to a fraction c of the size, then nearest-upsample back."""
    c = (0.75, 0.6, 0.45, 0.35, 0.25)[severity - 1]
    h, w = x.shape[-2:]
    small = F.interpolate(x, size=(max(1, round(h * c)), max(1, round(w * c))), mode="area")
    return F.interpolate(small, size=(h, w), mode="nearest")


def jpeg_compression(x: torch.Tensor, severity: int, rng: np.random.Generator) -> torch.Tensor:
    """Re-encode with PIL's JPEG encoder at ImageNet-C qualities (25 down to 7)."""
    from PIL import Image

    quality = (25, 18, 15, 10, 7)[severity - 1]
    if x.shape[1] not in (1, 3):
        raise ValueError(f"jpeg_compression needs 1 or 3 channels, got {x.shape[1]}")
    arr = (x.permute(0, 2, 3, 1).numpy() * 255.0).round().astype(np.uint8)
    out = np.empty_like(arr)
    for i, a in enumerate(arr):
        im = Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a)
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=quality)
        dec = np.asarray(Image.open(io.BytesIO(buf.getvalue())))
        out[i] = dec.reshape(a.shape)
    return torch.from_numpy(out).permute(0, 3, 1, 2).float() / 255.0


CORRUPTIONS: dict[str, Corruption] = {
    "gaussian_noise": gaussian_noise,
    "shot_noise": shot_noise,
    "impulse_noise": impulse_noise,
    "defocus_blur": defocus_blur,
    "glass_blur": glass_blur,
    "motion_blur": motion_blur,
    "zoom_blur": zoom_blur,
    "snow": snow,
    "frost": frost,
    "fog": fog,
    "brightness": brightness,
    "contrast": contrast,
    "elastic_transform": elastic_transform,
    "pixelate": pixelate,
    "jpeg_compression": jpeg_compression,
}


def corrupt(x: torch.Tensor, name: str, severity: int = 5, seed: int = 0) -> torch.Tensor:
    """Apply corruption ``name`` at ``severity`` (1-5) to images in [0, 1].

    ``x`` is N x C x H x W (or one C x H x W image). Same seed, same input, same
    output; the result is float32, clipped to [0, 1], on ``x``'s device.
    """
    if name not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}; choose from {', '.join(CORRUPTIONS)}")
    if isinstance(severity, bool) or not isinstance(severity, int) or not 1 <= severity <= 5:
        raise ValueError(f"severity must be an int in 1..5, got {severity!r}")
    single = x.ndim == 3
    xb = x.unsqueeze(0) if single else x
    if xb.ndim != 4:
        raise ValueError(f"expected N x C x H x W images, got shape {tuple(x.shape)}")
    if xb.numel() and (float(xb.min()) < 0 or float(xb.max()) > 1):
        raise ValueError("corruptions expect pixel values in [0, 1] (unnormalised images)")
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        out = CORRUPTIONS[name](xb.detach().cpu().float().contiguous(), severity, rng)
    out = out.clamp(0.0, 1.0).to(device=x.device, dtype=torch.float32)
    return out[0] if single else out
