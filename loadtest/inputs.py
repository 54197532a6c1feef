"""The images a load test sends: read from a folder or archive, or generated; and, for the v2
targets, the float32 tensor the server would compute from them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from loadtest.config import LoadConfig, LoadTestError

# CIFAR-10's usual normalisation; used for v2 tensors only when the model file cannot be read.
FALLBACK_PREPROCESSING = {"scale": 1 / 255, "mean": [0.4912, 0.482, 0.4464], "std": [0.2453, 0.2429, 0.2606]}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def generate_images(n: int, seed: int = 0, quality: int = 90) -> list[bytes]:
    """n different 32x32 JPEGs: smooth colour gradients plus noise (photo-like to the codec)."""
    import simplejpeg

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:32, 0:32].astype(np.float32) / 31.0
    out = []
    for _ in range(n):
        a, b, c = rng.uniform(0, 255, (3, 3)).astype(np.float32)
        img = a * (1 - yy[..., None]) + b * xx[..., None] + c * 0.3 * (xx * yy)[..., None]
        img += rng.normal(0, 20, (32, 32, 3)).astype(np.float32)
        pixels = np.ascontiguousarray(np.clip(img, 0, 255).astype(np.uint8))
        out.append(simplejpeg.encode_jpeg(pixels, quality=quality, colorspace="RGB"))
    return out


def read_images(path: str, limit: int) -> list[bytes]:
    """JPEG/PNG files from a folder (recursively, sorted) or a .tar/.tar.gz archive."""
    import tarfile

    p = Path(path)
    out: list[bytes] = []
    if p.is_dir():
        for f in sorted(x for x in p.rglob("*") if x.suffix.lower() in IMAGE_SUFFIXES and x.is_file()):
            out.append(f.read_bytes())
            if len(out) >= limit:
                break
    elif p.is_file() and tarfile.is_tarfile(p):
        with tarfile.open(p) as tar:
            for member in tar:
                if member.isfile() and Path(member.name).suffix.lower() in IMAGE_SUFFIXES:
                    data = tar.extractfile(member)
                    if data is not None:
                        out.append(data.read())
                        if len(out) >= limit:
                            break
    else:
        raise LoadTestError(f"--images {path}: not a folder or a tar archive")
    if not out:
        raise LoadTestError(f"--images {path}: no .jpg/.jpeg/.png files found")
    return out


def model_preprocessing(model_file: str | None) -> tuple[dict, str]:
    """The model's ``preprocessing`` metadata and where it came from."""
    if model_file and Path(model_file).is_file():
        try:
            import onnxruntime as ort

            so = ort.SessionOptions()
            so.log_severity_level = 3
            session = ort.InferenceSession(model_file, sess_options=so, providers=["CPUExecutionProvider"])
            pre = json.loads(session.get_modelmeta().custom_metadata_map["preprocessing"])
            return {k: pre[k] for k in ("scale", "mean", "std")}, model_file
        except Exception as e:
            return dict(FALLBACK_PREPROCESSING), f"fallback constants ({model_file}: {type(e).__name__}: {e})"
    return dict(FALLBACK_PREPROCESSING), f"fallback constants ({model_file} not found)"


def images_to_tensor(images: list[bytes], preprocessing: dict) -> np.ndarray:
    """Encoded images → float32 [n,3,32,32], exactly as the server would preprocess them."""
    from service.inference.preprocess import image_to_tensor

    return np.concatenate([image_to_tensor(im, preprocessing) for im in images])


def prepare_inputs(cfg: LoadConfig) -> tuple[list[bytes], np.ndarray | None, dict]:
    """Images (read or generated) and, for v2 targets, their preprocessed tensor."""
    info: dict[str, Any] = {}
    if cfg.images:
        images = read_images(cfg.images, cfg.max_images)
        info["images_source"] = f"{cfg.images} ({len(images)} files)"
    else:
        images = generate_images(cfg.generated, cfg.seed)
        info["images_source"] = f"generated ({len(images)} random 32x32 JPEGs)"
    info["image_bytes_mean"] = round(sum(len(im) for im in images) / len(images), 1)
    tensor = None
    if cfg.target.endswith("v2"):
        pre, source = model_preprocessing(cfg.model_file)
        try:
            tensor = images_to_tensor(images, pre)
        except Exception as e:
            raise LoadTestError(f"cannot decode the images for a v2 tensor: {type(e).__name__}: {e}") from None
        info["preprocessing"] = {**pre, "source": source}
    return images, tensor, info
