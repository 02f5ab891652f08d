"""Benchmark: how the shapes evaluator reads blurred and noisy ground truth (labels known).

    python benchmarks/evaluator_robustness.py [--n 500] [--evaluator path/to/shapes_eval.py]

Blurs (Gaussian, sigma in pixels of a 32x32 image) and adds noise (std in [-1, 1] units) to
validation images and scores them against their own captions. A generated image is never sharper
than its decoder, so an evaluator that misreads mildly blurred true images would blame the model
for what the evaluator cannot see. `--evaluator` scores with another version of the module, e.g.
`git show 3525940:ldm/eval/shapes_eval.py > /tmp/first_eval.py` for the first evaluator.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
from collections import Counter
from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from ldm.data.shapes import ShapesValidation, parse_caption  # noqa: E402

LADDER = [(0.0, 0.0), (0.5, 0.0), (0.7, 0.0), (0.9, 0.0), (1.1, 0.0), (1.5, 0.0), (0.0, 0.04), (0.0, 0.08),
          (0.7, 0.06)]


def load_evaluator(path: str | None):
    if path is None:
        from ldm.eval import shapes_eval
        return shapes_eval
    spec = importlib.util.spec_from_file_location("evaluator_under_test", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--evaluator", default=None, help="path of a shapes_eval.py to score with instead")
    args = p.parse_args()
    ev = load_evaluator(args.evaluator)
    ds = ShapesValidation(size=32, num_samples=args.n)
    items = [ds[i] for i in range(args.n)]
    captions = [it["caption"] for it in items]
    clean = np.stack([np.asarray(it["image"], dtype=np.float64) for it in items])
    rng = np.random.default_rng(0)
    print("| blur sigma | noise std | shape | all four | main confusions (true, size, read) |")
    print("| ---: | ---: | ---: | ---: | --- |")
    for sigma, noise in LADDER:
        imgs = np.stack([gaussian_filter(x, sigma=(sigma, sigma, 0)) for x in clean]) if sigma else clean.copy()
        imgs = np.clip(imgs + noise * rng.standard_normal(imgs.shape), -1.0, 1.0)
        r = ev.score(list(imgs), captions)
        wrong = Counter()
        for img, cap in zip(imgs, captions):
            want, got = parse_caption(cap)["shape"], ev.read_image(img).shape
            if got != want:
                wrong[(want, parse_caption(cap)["size"], got)] += 1
        print(f"| {sigma} | {noise} | {r['shape']:.3f} | {r['all']:.3f} | {wrong.most_common(3)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
