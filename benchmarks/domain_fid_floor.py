"""The floor of the domain FID: real training images against the reference (validation) set, at a sample size N.

A Frechet distance from N samples is biased upwards (the covariance of few samples is noisy), so a model's
domain FID at N samples is read against this: N real images score it too.

    python benchmarks/domain_fid_floor.py --base configs/ldm/shapes_txt2img.yaml \
        --classifier models/domain/shapes.safetensors --n 500 --reference_set params.num_samples=1000
"""
from __future__ import annotations

import argparse
import json

import numpy as np
import torch
from omegaconf import OmegaConf



def main() -> None:
    from ldm.eval.features import DomainFeatures
    from ldm.eval.reference import SUBSET_SEED, dataset_config, dataset_images, reference_features, subset_indices
    from ldm.eval.statistics import GaussianStats, frechet_distance
    from ldm.util import instantiate_from_config
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True)
    p.add_argument("--classifier", required=True)
    p.add_argument("--n", type=int, nargs="+", default=[200, 500])
    p.add_argument("--reference_set", nargs="*", default=[])
    p.add_argument("--repeats", type=int, default=3, help="disjoint random sets of N training images")
    p.add_argument("--cache_dir", default="cache/eval")
    p.add_argument("--own_subset", action="store_true",
                   help="also score the reference's own seeded subset of N (the caption-matched floor of text models,"
                        " whose evaluation prompts are the captions of that subset)")
    p.add_argument("--balanced", default=None, metavar="KEY",
                   help="draw each set with equal counts per value of this label (as class-balanced sampling does)")
    opt = p.parse_args()
    cfg = OmegaConf.load(opt.base)
    ex = DomainFeatures(opt.classifier)
    ref = reference_features(dataset_config(cfg, "data.params.validation", opt.reference_set), ex,
                             cache_dir=opt.cache_dir)
    train = instantiate_from_config(dataset_config(cfg, "data.params.train", []))
    own = {}
    if opt.own_subset:
        reference = instantiate_from_config(dataset_config(cfg, "data.params.validation", opt.reference_set))
        for n in opt.n:
            idx = subset_indices(len(reference), n, SUBSET_SEED)
            feats = ex(torch.cat(list(dataset_images(reference, idx))))["features"]
            own[n] = frechet_distance(GaussianStats.of(feats), ref.stats)
    out = {}
    for n in opt.n:
        # disjoint random subsets (a prefix of a class-sorted dataset is not a sample of it)
        rng = np.random.default_rng(1)
        if opt.balanced:  # set i takes the i-th n/K items of each of the K labels
            labels = np.array([train[i][opt.balanced] for i in range(len(train))])
            groups = [rng.permutation(np.flatnonzero(labels == v)) for v in np.unique(labels)]
            per = n // len(groups)
            order = [int(j) for i in range(opt.repeats) for g in groups for j in g[i * per:(i + 1) * per]]
            n = per * len(groups)
        else:
            order = rng.permutation(len(train))[:n * opt.repeats].tolist()
        images = torch.cat(list(dataset_images(train, order)))
        fids = [frechet_distance(GaussianStats.of(ex(images[i * n:(i + 1) * n])["features"]), ref.stats)
                for i in range(opt.repeats)]
        out[n] = {"mean": float(np.mean(fids)), "min": float(np.min(fids)), "max": float(np.max(fids))}
    print(json.dumps({"reference_images": len(ref), "classifier": ex.settings["weights_sha256"], "floor": out,
                      "own_subset": own},
                     indent=2))


if __name__ == "__main__":
    main()
