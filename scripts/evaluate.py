"""Evaluate a checkpoint over a grid of samplers x steps x guidance scales: sample N images per cell (per-image
seeds: image k uses seed + k, so reruns and other batch sizes give the same images), score them, and write
results.csv / results.json with every setting. Rerunning the same command resumes where it stopped.

    python scripts/evaluate.py -r logs/<run> --n 1000 --samplers ddim dpmpp_2m --steps 10 20 50 --scales 1 3 5 \
        --metrics fid kid prc isc --outdir outputs/eval/<name>
    python scripts/evaluate.py -r logs/<shapes run> --metrics domain_fid adherence \
        --domain_classifier models/domain/shapes.safetensors --reference_set params.num_samples=1000

Metrics: fid kid isc prc (TF-FID Inception-v3; weights from --inception_weights or the torch hub cache),
domain_fid domain_kid domain_prc (a classifier from scripts/train_domain_classifier.py), clip (a CLIP model
folder or hub id, --clip_model), adherence (shapes captions: the shapes evaluator; class labels: the domain
classifier's accuracy). The reference set is the run config's validation dataset (--reference picks another
config key or a YAML file), read with the training data's preprocessing; its features are cached in
--cache_dir with their settings. Class-conditional models get class-balanced labels (k mod n_classes);
text models get the reference items' captions (or --from_file).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from ldm.checkpoint import ModelKind
from ldm.cli import UsageError, check_options
from ldm.errors import entry_point
from ldm.eval.cost import unet_forward_flops
from ldm.eval.evaluator import METRICS, Evaluator
from ldm.eval.generate import conditions_for
from ldm.eval.grid import grid, run_grid
from ldm.eval.reference import dataset_config
from ldm.files import file_hash
from ldm.runs import default_device, load_for_sampling, resolve_resume
from ldm.precision import WeightsDType
from ldm.sampling import SAMPLERS
from ldm.util import instantiate_from_config


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("-r", "--resume", required=True, help="a run directory (logs/<run>) or a checkpoint file")
    p.add_argument("--config", default=None, help="the model config (default: the run's)")
    p.add_argument("--outdir", required=True, help="results, samples and the resume state go here")
    p.add_argument("--n", type=int, default=1000, help="samples per grid cell")
    p.add_argument("--batch_size", type=int, default=50)
    p.add_argument("--seed", type=int, default=0, help="image k of every cell uses seed + k")
    p.add_argument("--samplers", nargs="+", default=None, choices=sorted(SAMPLERS),
                   help="default: the model config's `sampler` (ddim unless it names one)")
    p.add_argument("--steps", nargs="+", type=int, default=[50])
    p.add_argument("--scales", nargs="+", type=float, default=[1.0], help="classifier-free guidance scales")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta")
    p.add_argument("--metrics", nargs="+", default=["fid"], choices=METRICS)
    p.add_argument("--reference", default="data.params.validation",
                   help="the reference dataset: a key of the run config, or a YAML file with target/params")
    p.add_argument("--reference_set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="overrides of the reference dataset config, e.g. params.num_samples=1000")
    p.add_argument("--n_reference", type=int, default=None, help="reference images (default: the whole dataset)")
    p.add_argument("--cache_dir", default="cache/eval", help="reference features are cached here")
    p.add_argument("--inception_weights", default=None, help="the TF-FID Inception weights file (.pth)")
    p.add_argument("--resize", default="pil_bicubic", choices=["pil_bicubic", "tf_bilinear"])
    p.add_argument("--clip_model", default="openai/clip-vit-large-patch14", help="hub id or local folder")
    p.add_argument("--domain_classifier", default=None, help="a .safetensors from scripts/train_domain_classifier.py")
    p.add_argument("--from_file", default=None, help="prompts, one per line (text models)")
    p.add_argument("--kid_subset_size", type=int, default=1000)
    p.add_argument("--no_save_samples", action="store_true", help="do not keep PNGs (resume then restarts a cell)")
    p.add_argument("--no-ema", action="store_true", help="sample with the training weights, not the EMA ones")
    p.add_argument("--unsafe-load", action="store_true", help="allow pickled objects in the checkpoint")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=WeightsDType.FP32.value, choices=[x.value for x in WeightsDType],
                   help="dtype the weights are loaded in (auto: the checkpoint's own)")
    return p


def read_prompts(path: str) -> list[str]:
    """--from_file's prompts, one per line; a missing or empty file is refused."""
    if not Path(path).is_file():
        raise UsageError(f"--from_file {path}: no such file")
    prompts = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    if not prompts:
        raise UsageError(f"--from_file {path}: no prompts in it")
    return prompts


def check_arguments(opt: argparse.Namespace) -> None:
    """Every count, amount and path of the command line, before any work."""
    check_options(opt)  # --n, --batch_size, every --steps, --n_reference, --kid_subset_size at least 1; --eta >= 0
    for flag in ("domain_classifier", "inception_weights"):
        path = getattr(opt, flag)
        if path is not None and not Path(path).is_file():
            raise UsageError(f"--{flag} {path}: no such file")
    if Path(opt.outdir).exists() and not Path(opt.outdir).is_dir():
        raise UsageError(f"--outdir {opt.outdir} exists and is not a folder")


@entry_point
def main(argv=None) -> int:
    opt = get_parser().parse_args(argv)
    check_arguments(opt)
    prompts = read_prompts(opt.from_file) if opt.from_file else None
    ckpt, cfg_path, _ = resolve_resume(opt.resume)
    device = opt.device or default_device()
    model, cfg = load_for_sampling(ckpt, opt.config or cfg_path, allow_pickle=opt.unsafe_load, device=device,
                                   dtype=opt.dtype, kind=ModelKind.DIFFUSION)
    ref_cfg = dataset_config(cfg, opt.reference, opt.reference_set)
    evaluator = Evaluator(opt.metrics, reference=ref_cfg, n_reference=opt.n_reference, cache_dir=opt.cache_dir,
                          inception_weights=opt.inception_weights, resize=opt.resize, clip_model=opt.clip_model,
                          domain_classifier=opt.domain_classifier, device=device,
                          kid_subset_size=opt.kid_subset_size)
    reference = instantiate_from_config(ref_cfg) if prompts is None else None
    conditions = conditions_for(model, opt.n, reference=reference, prompts=prompts)
    raw = conditions.batch(0, 1)
    if conditions.kind == "class":
        raw = torch.tensor(raw, device=model.device)
    with torch.no_grad():
        c = model.get_learned_conditioning(raw) if raw is not None else None
    tokens = c.shape[1] if isinstance(c, torch.Tensor) and c.dim() == 3 else 0
    shape = (model.channels, model.image_size, model.image_size)
    flops = unet_forward_flops(model.model.diffusion_model, shape, context_tokens=tokens)
    settings = {"checkpoint": str(ckpt), "checkpoint_sha256": file_hash(ckpt), "config": str(opt.config or cfg_path),
                "n": opt.n, "seed": opt.seed, "eta": opt.eta, "ema": not opt.no_ema, "conditions": conditions.kind,
                "latent_shape": list(shape), "unet_params": sum(p.numel() for p in model.model.parameters()),
                "unet_gflops_per_forward": flops / 1e9, "evaluation": evaluator.settings()}
    cells = grid(opt.samplers or [model.sampler_name], opt.steps, opt.scales)
    rows = run_grid(model, cells, evaluator, conditions, n=opt.n, seed=opt.seed, batch_size=opt.batch_size,
                    outdir=Path(opt.outdir), settings=settings, save_samples=not opt.no_save_samples,
                    flops_per_forward=flops, sampler_options={"eta": opt.eta} if opt.eta else None,
                    use_ema=not opt.no_ema)
    keys = [k for k in rows[0] if k not in ("cell", "sampler", "steps", "scale", "settings_key", "seed", "n")]
    shown = [k for k in keys if isinstance(rows[0][k], float)][:6]
    print("cell".ljust(32) + "".join(k[:14].rjust(15) for k in shown))
    for r in rows:
        print(r["cell"].ljust(32) + "".join(f"{r[k]:15.4f}" for k in shown))
    print(f"results: {Path(opt.outdir) / 'results.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
