"""Train the small classifier whose feature space gives the offline domain FID (ldm.eval.domain), on the train and
validation datasets of a config, read as its data loader reads them (cached latents are unwrapped to their
images). The weights and settings (labels, validation accuracy, data) go into one .safetensors file.

    python scripts/train_domain_classifier.py --base configs/ldm/mnist_class_cond.yaml --labels class_label \
        --out models/domain/mnist.safetensors
    python scripts/train_domain_classifier.py --base configs/ldm/shapes_txt2img.yaml \
        --labels shape color size position --train_set params.num_samples=8000 \
        --validation_set params.num_samples=1000 --out models/domain/shapes.safetensors
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from ldm.cli import UsageError, check_options
from ldm.errors import entry_point
from ldm.eval.domain import save_domain_classifier, train_domain_classifier
from ldm.eval.reference import dataset_config
from ldm.files import check_outputs
from ldm.util import ConfigError, instantiate_from_config, load_config


@entry_point
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--base", required=True, help="a config with data.params.train / validation")
    p.add_argument("--labels", nargs="+", required=True, help="item keys to classify (one head each)")
    p.add_argument("--out", required=True, help="the classifier (.safetensors)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--train_set", nargs="*", default=[], metavar="KEY=VALUE")
    p.add_argument("--validation_set", nargs="*", default=[], metavar="KEY=VALUE")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    opt = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    check_options(opt)
    if not opt.lr > 0:
        raise UsageError(f"--lr must be positive, got {opt.lr}")
    if not Path(opt.base).is_file():
        raise ConfigError(f"--base {opt.base}: file not found")
    check_outputs([opt.out], [opt.base], overwrite=opt.overwrite, flag="--out")
    cfg = load_config(opt.base)
    tr_cfg = dataset_config(cfg, "data.params.train", opt.train_set)
    va_cfg = dataset_config(cfg, "data.params.validation", opt.validation_set)
    train, validation = instantiate_from_config(tr_cfg), instantiate_from_config(va_cfg)
    trained = train_domain_classifier(train, validation, opt.labels, steps=opt.steps, batch_size=opt.batch_size,
                                      lr=opt.lr, seed=opt.seed, dataset={"train": tr_cfg, "validation": va_cfg})
    path = save_domain_classifier(trained, opt.out)
    print(json.dumps({"out": str(path), **{k: trained.info[k] for k in ("validation_accuracy", "train_seconds")}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
