"""Every generation task's output on tiny perturbed SD2 models with fixed seeds, for comparing two checkouts.

A refactor of the task layer must not move any output:
    python benchmarks/task_outputs.py . /tmp/new.pt            # this checkout
    python benchmarks/task_outputs.py /path/to/old /tmp/old.pt  # another (run from there with this script)
    python benchmarks/task_outputs.py --compare /tmp/old.pt /tmp/new.pt
The models are random (perturbed away from initialisation), the text encoder a stand-in: this measures that two
code paths agree, not image quality. About 1 minute on 2 CPU cores.
"""
import sys
from pathlib import Path

import torch

if sys.argv[1] == "--compare":
    a, b = torch.load(sys.argv[2]), torch.load(sys.argv[3])
    for key in a:
        diff = (a[key] - b[key]).abs().max().item() if key in b and a[key].shape == b[key].shape else float("nan")
        print(f"| {key} | {'identical' if diff == 0 else f'max abs diff {diff:.3g}'} |")
    sys.exit(0)
repo = Path(sys.argv[1]).resolve()
sys.path.insert(0, str(repo))
from ldm.util import instantiate_from_config  # noqa: E402

sys.path.insert(1, str(Path(__file__).resolve().parents[1] / "tests"))
from _helpers import perturb, tiny_sd2  # noqa: E402

try:
    from ldm.generation import img2img, sample_prompts
except ImportError:
    from ldm.inference import img2img, sample_prompts
from ldm.inpainting import inpaint  # noqa: E402
from ldm.superres import upscale  # noqa: E402
from ldm.eval.generate import conditions_for, generate  # noqa: E402


def tiny(name):
    """A tiny SD2 model of the checkout under test (tests/_helpers of this script's own checkout builds the config),
    perturbed, with a stand-in text encoder."""
    torch.manual_seed(0)
    m = instantiate_from_config(tiny_sd2(name).model).eval()
    perturb(m, seed=1)
    m.get_learned_conditioning = lambda texts: torch.stack([torch.full((3, 16), len(t) / 10) for t in texts])
    return m


t2i, inp, x4 = tiny("v2-inference"), tiny("v2-inpainting-inference"), tiny("x4-upscaling")
img = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3)) * 2 - 1
mask = torch.zeros(2, 1, 32, 32)
mask[..., 8:24, 8:24] = 1
out = {}
out["txt2img"] = sample_prompts(t2i, ["a", "bb"], steps=4, sampler="dpmpp_2m", scale=3.0, seed=[0, 1], shape=(4, 4, 4),
                                spacing="trailing")
out["img2img"] = img2img(t2i, img, ["a", "bb"], strength=0.75, steps=4, sampler="ddim", scale=3.0, seed=[0, 1], eta=0.5)
out["inpaint_replace"] = inpaint(t2i, img, mask, ["a", "bb"], steps=4, scale=3.0, seed=0, jump_length=2, jump_n_sample=2)
out["inpaint_model"] = inpaint(inp, img, mask, ["a", "bb"], steps=4, scale=3.0, seed=0, sampler="euler_ancestral")
out["upscale"] = upscale(x4, img[:, :, :16, :16], ["a", "bb"], steps=3, scale=3.0, noise_level=20, seed=0, tile=8,
                         overlap=2)
cond = conditions_for(t2i, 3, prompts=["a", "bb"])
out["eval"] = torch.cat([b for _, b in generate(t2i, 3, cond, sampler="heun", steps=2, scale=2.0, seed=5, batch_size=2)])
c = t2i.get_learned_conditioning(["a"])
out["ddpm_sample"] = t2i.sample(c, 1, steps=3, guidance_scale=2.0, uncond=t2i.get_learned_conditioning([""]),
                                shape=(4, 4, 4), generator=torch.Generator().manual_seed(0), guidance_rescale=0.5)
torch.save(out, sys.argv[2])
print({k: tuple(v.shape) for k, v in out.items()})
