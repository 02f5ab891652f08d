"""The BSRGAN degradation model (Zhang et al. 2021, "Designing a Practical Degradation Model for Deep Blind Image
Super-Resolution"), in the variant CompVis trained LDM-BSR with: blur(s), random downscaling, the exact final
downscaling, Gaussian noise and JPEG compression in a random order, then a final JPEG compression.

Deterministic per `numpy.random.Generator`; every drawn parameter is returned for logging. Resizing uses
PIL (cv2's linear / cubic / area interpolations map to PIL's bilinear / bicubic / box). The camera-ISP
step of the original (which needs a trained ISP model) is replaced by Poisson (shot) noise with the
same probability; the light variant has neither, as published.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
from PIL import Image
from scipy import ndimage

Params = list[dict[str, Any]]

# cv2 interpolation codes 1, 2, 3 (linear, cubic, area) as the original draws them, in PIL terms
_RANDOM_INTERPOLATIONS = (Image.BILINEAR, Image.BICUBIC, Image.BOX)
_INTERPOLATION_NAMES = {Image.BILINEAR: "bilinear", Image.BICUBIC: "bicubic", Image.BOX: "area"}

# interpolation-only degradations by the names the CompVis SR datasets use
DEGRADATIONS: dict[str, int] = {
    "pil_nearest": Image.NEAREST, "pil_bilinear": Image.BILINEAR, "pil_bicubic": Image.BICUBIC,
    "pil_box": Image.BOX, "pil_hamming": Image.HAMMING, "pil_lanczos": Image.LANCZOS,
    "cv_nearest": Image.NEAREST, "cv_bilinear": Image.BILINEAR, "cv_bicubic": Image.BICUBIC,
    "cv_area": Image.BOX, "cv_lanczos": Image.LANCZOS, "bicubic": Image.BICUBIC,
}


@dataclass(frozen=True)
class BSRSettings:
    """The numbers that differ between the full and the light variant (CompVis bsrgan.py / bsrgan_light.py)."""
    blur_steps: tuple[int, ...]        # which of the shuffled slots 0 / 1 blur
    aniso_l_max: float                 # anisotropic kernel eigenvalue bound, per (4 + sf)
    iso_sigma_max: float               # isotropic sigma bound, per (2 + 0.2 sf)
    aniso_ksize: tuple[int, int, int]  # kernel size = a * randint(lo, hi) + 3, as (a, lo, hi)
    iso_ksize: tuple[int, int, int]
    random_resize_prob: float          # downsample2: random factor (else shifted-Gaussian blur + nearest)
    noise_levels: tuple[int, int]      # Gaussian noise level range (of 255)
    jpeg_quality: tuple[int, int]
    poisson_prob: float                # in place of the camera-ISP step
    jpeg_prob: float = 0.9
    scale2_prob: float = 0.25          # for sf = 4: a first halving, then the rest at sf = 2


BSR_FULL = BSRSettings(blur_steps=(0, 1), aniso_l_max=1.0, iso_sigma_max=1.0, aniso_ksize=(2, 2, 11),
                       iso_ksize=(2, 2, 11), random_resize_prob=0.75, noise_levels=(2, 25), jpeg_quality=(30, 95),
                       poisson_prob=0.25)
BSR_LIGHT = BSRSettings(blur_steps=(0,), aniso_l_max=0.25, iso_sigma_max=0.25, aniso_ksize=(1, 2, 11),
                        iso_ksize=(1, 2, 4), random_resize_prob=0.8, noise_levels=(1, 2), jpeg_quality=(80, 95),
                        poisson_prob=0.0)


def _resize(img: np.ndarray, w: int, h: int, interpolation: int) -> np.ndarray:
    """Resize a float HWC image channel by channel (PIL mode F keeps the float values)."""
    w, h = max(1, int(w)), max(1, int(h))
    chans = [np.asarray(Image.fromarray(np.ascontiguousarray(img[..., c]), mode="F").resize((w, h), interpolation))
             for c in range(img.shape[-1])]
    return np.stack(chans, axis=-1).astype(np.float32)


def gaussian_kernel(ksize: int, sigma: float) -> np.ndarray:
    """Isotropic Gaussian kernel (MATLAB fspecial('gaussian')), normalised to sum 1."""
    r = (ksize - 1) / 2.0
    y, x = np.mgrid[-r:r + 1, -r:r + 1]
    k = np.exp(-(x * x + y * y) / (2.0 * max(sigma, 1e-8) ** 2))
    k[k < np.finfo(k.dtype).eps * k.max()] = 0
    return k / k.sum()


def anisotropic_gaussian_kernel(ksize: int, theta: float, l1: float, l2: float) -> np.ndarray:
    """Gaussian kernel with covariance eigenvalues l1, l2 rotated by theta, normalised to sum 1."""
    v = np.array([np.cos(theta), np.sin(theta)])
    rot = np.array([[v[0], v[1]], [v[1], -v[0]]])
    cov = rot @ np.diag([max(l1, 1e-6), max(l2, 1e-6)]) @ np.linalg.inv(rot)
    inv = np.linalg.inv(cov)
    c = ksize / 2.0 + 0.5
    y, x = np.mgrid[0:ksize, 0:ksize]
    d = np.stack([x - c + 1, y - c + 1], axis=-1)
    k = np.exp(-0.5 * np.einsum("...i,ij,...j->...", d, inv, d))
    return k / k.sum()


def _convolve(img: np.ndarray, k: np.ndarray) -> np.ndarray:
    return ndimage.convolve(img, k[..., None], mode="mirror").astype(np.float32)


def add_blur(img: np.ndarray, sf: int, rng: np.random.Generator, s: BSRSettings) -> tuple[np.ndarray, dict]:
    """Anisotropic or isotropic Gaussian blur, half and half."""
    if rng.random() < 0.5:
        a, lo, hi = s.aniso_ksize
        ksize = a * int(rng.integers(lo, hi + 1)) + 3
        l_max = (4.0 + sf) * s.aniso_l_max
        theta, l1, l2 = float(rng.random() * np.pi), float(l_max * rng.random()), float(l_max * rng.random())
        return _convolve(img, anisotropic_gaussian_kernel(ksize, theta, l1, l2)), {
            "op": "blur_aniso", "ksize": ksize, "theta": theta, "l1": l1, "l2": l2}
    a, lo, hi = s.iso_ksize
    ksize = a * int(rng.integers(lo, hi + 1)) + 3
    sigma = float((2.0 + 0.2 * sf) * s.iso_sigma_max * rng.random())
    return _convolve(img, gaussian_kernel(ksize, sigma)), {"op": "blur_iso", "ksize": ksize, "sigma": sigma}


def add_gaussian_noise(img: np.ndarray, rng: np.random.Generator, lo: int, hi: int) -> tuple[np.ndarray, dict]:
    """Color, grayscale or channel-correlated Gaussian noise of level in [lo, hi] / 255."""
    level = int(rng.integers(lo, hi + 1))
    r = rng.random()
    if r > 0.6:
        kind, noise = "color", rng.normal(0, level / 255.0, img.shape)
    elif r < 0.4:
        kind, noise = "gray", rng.normal(0, level / 255.0, (*img.shape[:2], 1))
    else:
        kind = "correlated"
        d = np.diag(rng.random(3))
        u, _ = np.linalg.qr(rng.random((3, 3)))
        cov = np.abs((hi / 255.0) ** 2 * (u.T @ d @ u))
        noise = rng.multivariate_normal(np.zeros(3), cov, img.shape[:2])
    return np.clip(img + noise.astype(np.float32), 0, 1), {"op": "gaussian_noise", "level": level, "kind": kind}


def add_poisson_noise(img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """Shot noise at 10^[2, 4] photons per unit intensity, on color or luminance."""
    img = np.clip(np.round(img * 255.0), 0, 255) / 255.0
    vals = float(10 ** (2 * rng.random() + 2.0))
    if rng.random() < 0.5:
        out, kind = rng.poisson(img * vals).astype(np.float32) / vals, "color"
    else:
        gray = np.clip(np.round(img[..., :3] @ np.array([0.299, 0.587, 0.114]) * 255.0), 0, 255) / 255.0
        out, kind = img + (rng.poisson(gray * vals).astype(np.float32) / vals - gray)[..., None], "gray"
    return np.clip(out, 0, 1).astype(np.float32), {"op": "poisson_noise", "photons": vals, "kind": kind}


def add_jpeg_noise(img: np.ndarray, rng: np.random.Generator, lo: int, hi: int) -> tuple[np.ndarray, dict]:
    """JPEG compression at a quality in [lo, hi]."""
    q = int(rng.integers(lo, hi + 1))
    buf = io.BytesIO()
    Image.fromarray(np.uint8(np.clip(img, 0, 1) * 255.0 + 0.5)).save(buf, format="JPEG", quality=q)
    buf.seek(0)
    with Image.open(buf) as im:
        out = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
    return out, {"op": "jpeg", "quality": q}


def degrade(image: np.ndarray, sf: int = 4, rng: Optional[np.random.Generator] = None,
            settings: BSRSettings = BSR_FULL) -> tuple[np.ndarray, Params]:
    """(low-quality uint8 image of size (H // sf, W // sf), the drawn parameters) for a uint8 HWC RGB image."""
    rng = np.random.default_rng() if rng is None else rng
    img = np.asarray(image, dtype=np.float32)[..., :3] / 255.0
    h1, w1 = img.shape[:2]
    img = img[:h1 - h1 % sf, :w1 - w1 % sf]
    params: Params = []
    if sf == 4 and rng.random() < settings.scale2_prob:  # downsample1: halve first
        interp = Image.BICUBIC if rng.random() >= 0.5 else _RANDOM_INTERPOLATIONS[int(rng.integers(3))]
        img = np.clip(_resize(img, img.shape[1] // 2, img.shape[0] // 2, interp), 0, 1)
        params.append({"op": "downsample1", "factor": 2, "interpolation": _INTERPOLATION_NAMES[interp]})
        sf = 2
    order = [int(i) for i in rng.permutation(7)]
    i2, i3 = order.index(2), order.index(3)
    if i2 > i3:  # the random downscale (2) always comes before the exact one (3)
        order[i2], order[i3] = order[i3], order[i2]
    params.append({"op": "order", "order": order})
    a = b = None
    for step in order:
        if step in (0, 1) and step in settings.blur_steps:
            img, p = add_blur(img, sf, rng, settings)
            params.append(p)
        elif step == 2:  # downsample2: random factor in [1, 2 sf], or shifted Gaussian blur + nearest by sf
            b, a = img.shape[:2]
            if rng.random() < settings.random_resize_prob:
                sf1 = float(rng.uniform(1, 2 * sf))
                interp = _RANDOM_INTERPOLATIONS[int(rng.integers(3))]
                img = _resize(img, int(img.shape[1] / sf1), int(img.shape[0] / sf1), interp)
                params.append({"op": "downsample2", "factor": sf1, "interpolation": _INTERPOLATION_NAMES[interp]})
            else:
                sigma = float(rng.uniform(0.1, 0.6 * sf))
                k = ndimage.shift(gaussian_kernel(25, sigma), ((sf - 1) * 0.5, (sf - 1) * 0.5), order=1, mode="nearest")
                img = _convolve(img, k / k.sum())[0::sf, 0::sf]
                params.append({"op": "downsample2", "factor": sf, "blur_sigma": sigma, "interpolation": "nearest"})
            img = np.clip(img, 0, 1)
        elif step == 3:  # downsample3: to exactly 1 / sf of the size before downsample2
            interp = _RANDOM_INTERPOLATIONS[int(rng.integers(3))]
            img = np.clip(_resize(img, int(a / sf), int(b / sf), interp), 0, 1)
            params.append({"op": "downsample3", "factor": sf, "interpolation": _INTERPOLATION_NAMES[interp]})
        elif step == 4:
            img, p = add_gaussian_noise(img, rng, *settings.noise_levels)
            params.append(p)
        elif step == 5 and rng.random() < settings.jpeg_prob:
            img, p = add_jpeg_noise(img, rng, *settings.jpeg_quality)
            params.append(p)
        elif step == 6 and settings.poisson_prob > 0 and rng.random() < settings.poisson_prob:
            img, p = add_poisson_noise(img, rng)
            params.append(p)
    img, p = add_jpeg_noise(img, rng, *settings.jpeg_quality)  # the final JPEG compression
    params.append(p)
    return np.uint8(np.clip(img, 0, 1) * 255.0 + 0.5), params


def degradation_bsrgan_variant(image: np.ndarray, sf: int = 4, isp_model: Any = None,
                               rng: Optional[np.random.Generator] = None) -> dict[str, Any]:
    """CompVis `degradation_fn_bsr`: {"image": the degraded uint8 image, "params": the drawn parameters}."""
    if isp_model is not None:
        raise NotImplementedError("a camera ISP model is not provided; Poisson noise takes its place")
    out, params = degrade(image, sf, rng, BSR_FULL)
    return {"image": out, "params": params}


def interpolation_downscale(image: np.ndarray, sf: int, name: str) -> np.ndarray:
    """uint8 HWC image downscaled by `sf` with an interpolation named as in DEGRADATIONS."""
    if name not in DEGRADATIONS:
        raise ValueError(f"unknown degradation '{name}'; use bsrgan, bsrgan_light or one of {sorted(DEGRADATIONS)}")
    h, w = image.shape[:2]
    return np.asarray(Image.fromarray(np.asarray(image, dtype=np.uint8)).resize((w // sf, h // sf), DEGRADATIONS[name]))
