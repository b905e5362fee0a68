"""Real photographs shipped inside installed packages (scikit-image, scikit-learn), cut into
deterministic 224x224 crops and normalised the way EfficientNet-Lite expects: (x - 127) / 128."""

from __future__ import annotations

from typing import Iterator

import numpy as np

SIZE = 224


def _images() -> dict[str, np.ndarray]:
    from skimage import data
    from sklearn.datasets import load_sample_images

    out = {k: np.asarray(getattr(data, k)()) for k in ("chelsea", "coffee", "astronaut", "rocket", "camera", "horse")}
    china, flower = load_sample_images().images
    out["china"], out["flower"] = china, flower
    for k, v in out.items():
        v = v.astype(np.uint8) * 255 if v.dtype == bool else v
        v = np.stack([v] * 3, -1) if v.ndim == 2 else v
        out[k] = np.ascontiguousarray(v[..., :3]).astype(np.uint8)
    return out


def _preprocess(img: np.ndarray) -> np.ndarray:
    from PIL import Image

    pil = Image.fromarray(img).convert("RGB")
    w, h = pil.size
    s = 256 / min(w, h)
    pil = pil.resize((max(SIZE, round(w * s)), max(SIZE, round(h * s))), Image.BILINEAR)
    w, h = pil.size
    left, top = (w - SIZE) // 2, (h - SIZE) // 2
    a = np.asarray(pil.crop((left, top, left + SIZE, top + SIZE)), np.float32)
    return ((a - 127.0) / 128.0).transpose(2, 0, 1)


def crops(n: int, seed: int) -> np.ndarray:
    """``n`` crops: each image centred once, then random resized crops with flips."""
    rng = np.random.default_rng(seed)
    imgs = _images()
    keys = sorted(imgs)
    xs = []
    for i in range(n):
        a = imgs[keys[i % len(keys)]]
        if i >= len(keys):
            h, w = a.shape[:2]
            sc = rng.uniform(0.5, 1.0)
            ch, cw = int(h * sc), int(w * sc)
            t, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
            a = a[t:t + ch, left:left + cw]
            a = a[:, ::-1] if rng.random() < 0.5 else a
        xs.append(_preprocess(np.ascontiguousarray(a)))
    return np.stack(xs).astype(np.float32)


def evaluation(n: int = 64, batch_size: int = 16) -> Iterator[dict[str, np.ndarray]]:
    x = crops(n, seed=0)
    for i in range(0, n, batch_size):
        yield {"input": x[i:i + batch_size]}


def calibration(n: int = 64, batch_size: int = 16) -> Iterator[dict[str, np.ndarray]]:
    x = crops(n, seed=1)
    for i in range(0, n, batch_size):
        yield {"input": x[i:i + batch_size]}
