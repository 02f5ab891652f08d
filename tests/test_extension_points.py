"""The core's extension points: configs that refuse typos, UNets from overridable block factories, one training
path through the denoiser, one schedule object, and a package graph without cycles."""
from __future__ import annotations

import logging

import pytest
import torch
from omegaconf import OmegaConf

from ldm.util import ConfigError, instantiate_from_config


def _tiny_unet_params(**over) -> dict:
    p = dict(image_size=8, in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[2],
             num_res_blocks=1, channel_mult=[1, 2], num_heads=2, use_spatial_transformer=True, context_dim=16)
    p.update(over)
    return p


def _tiny_ddpm_config(**params) -> dict:
    return OmegaConf.create({"model": {
        "target": "ldm.models.diffusion.ddpm.DDPM",
        "params": {"unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
                                   "params": _tiny_unet_params(use_spatial_transformer=False, context_dim=None,
                                                               in_channels=3, out_channels=3)},
                   "image_size": 8, "timesteps": 100, **params}}})


# -- configs refuse typos --------------------------------------------------------------------------------------
def test_a_misspelt_model_key_is_refused_with_the_closest_name(monkeypatch):
    built = []
    from ldm.models.diffusion import diffusion_module
    monkeypatch.setattr(diffusion_module.DiffusionWrapper, "__init__",
                        lambda *a, **k: built.append(1) or (_ for _ in ()).throw(AssertionError("built")))
    cfg = _tiny_ddpm_config(parameterizaton="v")
    with pytest.raises(ConfigError) as e:
        instantiate_from_config(cfg.model, key="model")
    msg = str(e.value)
    assert "model.params" in msg and "'parameterizaton'" in msg and "did you mean 'parameterization'" in msg
    assert not built  # refused before any part was built


def test_a_misspelt_key_of_a_subclass_and_of_a_sub_config_is_refused():
    cfg = OmegaConf.create({"target": "ldm.models.diffusion.ddpm.LatentDiffusion",
                            "params": {"first_stage_config": "__is_unconditional__", "cond_stage_config": None,
                                       "unet_config": {}, "scale_factr": 0.18215}})
    with pytest.raises(ConfigError, match="did you mean 'scale_factor'"):
        instantiate_from_config(cfg)
    unet = OmegaConf.create({"unet": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
                                      "params": _tiny_unet_params(num_head=2)}})
    with pytest.raises(ConfigError) as e:
        instantiate_from_config(unet.unet)
    assert "unet.params" in str(e.value) and "did you mean 'num_heads'" in str(e.value)


def test_lora_and_compile_sub_configs_refuse_typos():
    from ldm.compile import CompileSettings
    from ldm.errors import InputError
    from ldm.lora import LoraSettings
    with pytest.raises(InputError, match="did you mean 'rank'"):
        LoraSettings.from_config({"rnak": 4})
    with pytest.raises(ConfigError, match="did you mean 'mode'"):
        CompileSettings.parse({"mdoe": "default"})


def test_compatibility_keys_without_effect_are_listed_and_logged_once(caplog):
    from ldm.config_keys import NO_EFFECT_KEYS
    import ldm.config_keys
    assert "use_fp16" in NO_EFFECT_KEYS["UNetModel"] and "use_positional_encodings" in NO_EFFECT_KEYS["DDPM"]
    ldm.config_keys._reported.clear()
    cfg = _tiny_ddpm_config(use_positional_encodings=True)
    with caplog.at_level(logging.INFO):
        instantiate_from_config(cfg.model)
        instantiate_from_config(cfg.model)
    assert sum("use_positional_encodings" in r.getMessage() for r in caplog.records) == 1


# -- UNets from block factories ------------------------------------------------------------------------------
class _FrameProbe(torch.nn.Module):
    """A layer after each block: a zero-initialised 1x1 conv added to x, recording the frame count it was given."""

    block_inputs = ("emb", "num_frames")

    def __init__(self, ch: int):
        super().__init__()
        self.mix = torch.nn.Conv2d(ch, ch, 1)
        torch.nn.init.zeros_(self.mix.weight)
        torch.nn.init.zeros_(self.mix.bias)
        self.seen = []

    def forward(self, x, emb, num_frames):
        self.seen.append(num_frames)
        return x + self.mix(x)


def _block_channels(layers) -> int:
    last = layers[-1]
    return getattr(last, "out_channels", None) or getattr(last, "in_channels", None) or last.weight.shape[0]


def test_a_unet_subclass_adds_a_layer_after_every_block_by_overriding_one_factory():
    from _helpers import perturb
    from ldm.modules.diffusionmodules.openaimodel import TimestepEmbedSequential, UNetModel

    class FrameUNet(UNetModel):
        extra_inputs = ("num_frames",)

        def make_block(self, layers, part, level):
            return TimestepEmbedSequential(*layers, _FrameProbe(_block_channels(layers)))

    torch.manual_seed(0)
    base = UNetModel(**_tiny_unet_params())
    torch.manual_seed(0)
    video = FrameUNet(**_tiny_unet_params())
    blocks = [*video.input_blocks, video.middle_block, *video.output_blocks]
    assert all(isinstance(b[-1], _FrameProbe) for b in blocks) and len(blocks) == 9
    own = set(base.state_dict())
    assert own < set(video.state_dict())  # the image UNet's keys unchanged, the new layers' added
    perturb(base, seed=1)
    video.load_state_dict(base.state_dict(), strict=False)
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([3, 700]), torch.randn(2, 5, 16)
    with torch.no_grad():
        ref = base(x, t, context=ctx)
        out = video(x, t, context=ctx, num_frames=2)
    assert torch.equal(ref, out)  # zero-initialised layers: the image UNet exactly
    assert all(b[-1].seen == [2] for b in blocks)  # every block received the new input


def test_unet_forward_refuses_an_input_it_does_not_know():
    from ldm.modules.diffusionmodules.openaimodel import UNetModel
    unet = UNetModel(**_tiny_unet_params())
    with pytest.raises(TypeError, match="unknown input num_frames"):
        unet(torch.randn(1, 4, 8, 8), torch.tensor([1]), context=torch.randn(1, 5, 16), num_frames=1)


# -- one training path through the denoiser ---------------------------------------------------------------------
def _old_loss(model, x0, t, noise, loss_type):
    """The training loss as it was before it went through the denoiser (the network at integer timesteps on the VP
    tables, regressed on the scaling's target), kept here as the reference."""
    sa = model.sqrt_alphas_cumprod[t].view(-1, 1, 1, 1)
    s1 = model.sqrt_one_minus_alphas_cumprod[t].view(-1, 1, 1, 1)
    out = model.apply_model(sa * x0 + s1 * noise, t, None)
    target = model.scaling.target(x0, noise, sa, s1)
    err = (out - target).pow(2) if loss_type == "l2" else (out - target).abs()
    loss_simple = err.mean(dim=[1, 2, 3])
    snr = (model.sqrt_alphas_cumprod[t] / model.sqrt_one_minus_alphas_cumprod[t]) ** 2
    loss = model.loss_fn.weighting(t, snr, model.scaling.parameterization) * loss_simple
    if model.learn_logvar:
        loss = loss / torch.exp(model.logvar[t]) + model.logvar[t]
    total = model.loss_fn.l_simple_weight * loss.mean()
    if model.loss_fn.original_elbo_weight:
        total = total + model.loss_fn.original_elbo_weight * (model.lvlb_weights[t] * loss_simple).mean()
    return total


@pytest.mark.parametrize("parameterization,loss_type,extra", [
    ("eps", "l2", {}), ("v", "l2", {"loss_weighting": {"target": "ldm.modules.diffusionmodules.loss.MinSNRWeighting"}}),
    ("x0", "l1", {"learn_logvar": True}), ("eps", "l1", {"original_elbo_weight": 0.01}),
])
def test_the_loss_through_the_denoiser_equals_the_old_loss_and_gradients(parameterization, loss_type, extra):
    from _helpers import perturb
    torch.manual_seed(0)
    model = instantiate_from_config(_tiny_ddpm_config(parameterization=parameterization, loss_type=loss_type,
                                                      timesteps=1000, **extra).model)
    perturb(model.model, seed=2)
    if model.learn_logvar:
        with torch.no_grad():
            model.logvar.normal_(0, 0.3)
    x0, noise = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    t = torch.tensor([0, 17, 500, 999])
    params = [p for p in model.parameters() if p.requires_grad]

    def loss_and_grads(fn):
        loss = fn()
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        return loss.detach(), [g for g in grads if g is not None]

    new, new_g = loss_and_grads(lambda: model.p_losses(x0, None, t, noise=noise)[0])
    old, old_g = loss_and_grads(lambda: _old_loss(model, x0, t, noise, loss_type))
    assert torch.allclose(new, old, rtol=2e-6, atol=0), (new, old)
    assert len(new_g) == len(old_g) > 0
    scale = max(g.abs().max().item() for g in old_g)  # some gradients are zero but for rounding (a norm's bias)
    for a, b in zip(new_g, old_g):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5 * scale), (a - b).abs().max()


def test_drawn_timesteps_reach_the_network_as_the_integers_they_were():
    model = instantiate_from_config(_tiny_ddpm_config(timesteps=1000).model)
    seen = []
    model.apply_model = lambda x, t, c: seen.append(t) or torch.zeros_like(x)
    model.p_losses(torch.randn(64, 3, 8, 8), None)
    t = seen[0]
    assert torch.equal(t, t.round()) and 0 <= t.min() and t.max() <= 999 and len(set(t.tolist())) > 30


def test_edm_training_is_a_config():
    cfg = _tiny_ddpm_config(timestep_sampler={"target": "ldm.modules.diffusionmodules.loss.EDMLogNormalSigmas",
                                              "params": {"p_mean": -1.2, "p_std": 1.2}}, timesteps=1000)
    model = instantiate_from_config(cfg.model)
    levels = []
    real = model.training_denoiser

    def spy():
        den = real()
        inner = den.denoise_with_output

        def record(x, sigma, **c):
            levels.append(sigma)
            return inner(x, sigma, **c)
        den.denoise_with_output = record
        return den
    model.training_denoiser = spy
    torch.manual_seed(0)
    loss, log = model.p_losses(torch.randn(2048, 3, 8, 8) * 0.5, None)
    loss.backward()
    log_sigma = levels[0].log()
    assert torch.isfinite(loss) and model.model.diffusion_model.out[2].weight.grad.abs().sum() > 0
    assert abs(log_sigma.mean().item() + 1.2) < 0.1 and abs(log_sigma.std().item() - 1.2) < 0.1
    assert not torch.equal(log_sigma, log_sigma.round())  # continuous levels, not timesteps of the grid


# -- one schedule ------------------------------------------------------------------------------------------------
def test_one_schedule_object_feeds_training_sampling_and_the_compvis_shells():
    from ldm.models.diffusion.ddim import DDIMSampler
    model = instantiate_from_config(_tiny_ddpm_config(timesteps=1000).model)
    sched = model.noise_schedule
    assert model.denoiser().schedule is sched and model.training_denoiser().schedule is sched
    q = model.denoiser(quantize=True).schedule
    assert q.quantize and q.sigmas.data_ptr() == sched.sigmas.data_ptr()  # a view, not rebuilt
    assert torch.equal(sched.alphas_cumprod, model.alphas_cumprod.double())
    model.half()
    assert sched.sigmas.dtype == torch.float32  # the noise levels are not rounded with the weights
    ddim = DDIMSampler(model)
    ddim.make_schedule(10, verbose=False)
    assert torch.equal(ddim.ddim_alphas, sched.alphas_cumprod[ddim.ddim_timesteps])


# -- layering ---------------------------------------------------------------------------------------------------
def _import_graph() -> dict[str, dict[str, list[str]]]:
    """{node: {imported node: [file:line, ...]}} over every import statement of the package (lazy ones too), with a
    node per subpackage (ldm.core, ldm.modules, ldm.sampling, ...) and per top-level module (ldm.util, ...)."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "ldm"

    def node(name: str) -> str:
        return ".".join(name.split(".")[:2])

    graph: dict[str, dict[str, list[str]]] = {}
    for f in root.rglob("*.py"):
        mod = ".".join(f.relative_to(root.parent).with_suffix("").parts).removesuffix(".__init__")
        for n in ast.walk(ast.parse(f.read_text())):
            names = [n.module] if isinstance(n, ast.ImportFrom) and n.module and n.level == 0 else \
                [a.name for a in n.names] if isinstance(n, ast.Import) else []
            for name in names:
                if name.split(".")[0] == "ldm" and node(name) != node(mod):
                    graph.setdefault(node(mod), {}).setdefault(node(name), []).append(f"{f.name}:{n.lineno}")
    return graph


def _cycles(graph: dict[str, dict[str, list[str]]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in list(graph):
        if v not in index:
            visit(v)
    return found


def test_the_package_import_graph_has_no_cycle():
    graph = _import_graph()
    cycles = _cycles(graph)
    detail = [f"{a} -> {b}: {graph[a][b][:3]}" for c in cycles for a in c for b in c if b in graph.get(a, {})]
    assert not cycles, f"import cycles between packages: {cycles}; {detail}"
    # the core math imports nothing else of the framework; the networks and the samplers both stand on it
    assert set(graph.get("ldm.core", {})) == set(), graph.get("ldm.core")
    assert "ldm.sampling" not in graph.get("ldm.modules", {}), graph["ldm.modules"].get("ldm.sampling")
    assert {"ldm.core"} <= set(graph["ldm.sampling"]) and {"ldm.core"} <= set(graph["ldm.modules"])
    # models know no callbacks, CLI or datasets
    assert not {"ldm.callbacks", "ldm.cli", "ldm.data"} & set(graph.get("ldm.models", {})), graph["ldm.models"]



def test_models_read_the_trainer_through_public_properties_only():
    """No private Lightning attribute (`_trainer`, `_logger_connector`, ...) nor loop progress internals in the
    models: they go through ldm.models.trainer_state."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "ldm" / "models"
    private = {"_trainer", "_fabric", "_logger_connector", "_results", "_accelerator_connector",
               "_checkpoint_connector", "_data_connector", "_current_fx_name", "batch_progress", "epoch_loop"}
    found = [f"{f.name}:{n.lineno} .{n.attr}" for f in root.rglob("*.py") for n in ast.walk(ast.parse(f.read_text()))
             if isinstance(n, ast.Attribute) and n.attr in private]
    assert not found, found


def test_get_input_moves_channels_first_for_images_and_clips():
    from ldm.models.diffusion.diffusion_module import DDPM

    model = instantiate_from_config(_tiny_ddpm_config().model)
    image = torch.rand(2, 8, 8, 3)
    clip = torch.rand(2, 5, 8, 8, 3)  # (B, T, H, W, C): frames of a video dataset
    assert torch.equal(DDPM.get_input(model, {"x": image}, "x"), image.permute(0, 3, 1, 2))
    got = DDPM.get_input(model, {"x": clip}, "x")
    assert got.shape == (2, 3, 5, 8, 8) and got.is_contiguous() and torch.equal(got, clip.permute(0, 4, 1, 2, 3))
    assert DDPM.get_input(model, {"x": image[..., 0]}, "x").shape == (2, 1, 8, 8)
    one = DDPM.get_input(model, {"x": torch.rand(2, 8, 8, 1)}, "x")
    # one channel: canonical strides, as a copy makes them (the permuted view's are channels-last-like too, which
    # sends convolutions down another path)
    assert one.shape == (2, 1, 8, 8) and one.stride() == (64, 64, 8, 1)
