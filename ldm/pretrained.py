"""Where pretrained weights are found: an explicit path, then the owning library's cache, then its own download.

Every pretrained part (CLIP and OpenCLIP text encoders, MiniLM, the LPIPS backbone and heads, evaluation
networks) resolves its files here, in this order:

1. an explicit path from the config (a missing explicit path is an error, never a fallback);
2. the cache of the library that owns the weights, in that library's layout: the Hugging Face hub cache
   (`HF_HUB_CACHE`, else `HF_HOME/hub`, else `~/.cache/huggingface/hub`) for transformers and open_clip,
   the torch hub cache (`TORCH_HOME/hub/checkpoints`) for torchvision;
3. the library's own download call, only when the machine is not offline (`LDM_OFFLINE`, `HF_HUB_OFFLINE`
   or `TRANSFORMERS_OFFLINE` set to a true value).

Otherwise `PretrainedWeightsMissing` lists every place looked, the file names expected there and the config
key that sets an explicit path.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

logger = logging.getLogger(__name__)

OFFLINE_VARIABLES = ("LDM_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
_TRUE = {"1", "true", "yes", "on"}

# transformers' weight file names, in the order it prefers them
TRANSFORMERS_WEIGHTS = ("model.safetensors", "pytorch_model.bin")

PathLike = Union[str, os.PathLike]


class PretrainedWeightsMissing(FileNotFoundError):
    """The weights of a pretrained part are not on this machine and may not (or could not) be downloaded."""


def offline_variable() -> Optional[str]:
    """The first offline switch set to a true value (`NAME=value`), or None when downloads are allowed."""
    for name in OFFLINE_VARIABLES:
        value = os.environ.get(name, "")
        if value.strip().lower() in _TRUE:
            return f"{name}={value}"
    return None


def is_offline() -> bool:
    """True when any of LDM_OFFLINE, HF_HUB_OFFLINE, TRANSFORMERS_OFFLINE is set to a true value."""
    return offline_variable() is not None


def hf_hub_cache() -> Path:
    """The Hugging Face hub cache as huggingface_hub resolves it, read from the environment at call time."""
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(name):
            return Path(os.path.expanduser(os.environ[name]))
    if os.environ.get("HF_HOME"):
        return Path(os.path.expanduser(os.environ["HF_HOME"])) / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return Path(os.path.expanduser(xdg)) / "huggingface" / "hub"


def torch_hub_checkpoints() -> Path:
    """torchvision's weight cache: `<torch hub dir>/checkpoints` (honours TORCH_HOME)."""
    import torch.hub
    return Path(torch.hub.get_dir()) / "checkpoints"


def hf_repo_folder(repo_id: str, cache_dir: Optional[Path] = None) -> Path:
    """The folder of a model repository in the hub cache layout (`models--org--name`)."""
    return (cache_dir or hf_hub_cache()) / ("models--" + repo_id.replace("/", "--"))


def hf_cached_file(repo_id: str, filename: str, cache_dir: Optional[Path] = None,
                   revision: Optional[str] = None) -> Optional[Path]:
    """`filename` of `repo_id` in the hub cache (snapshot of `revision`, default main), or None. Never downloads."""
    from huggingface_hub import try_to_load_from_cache
    found = try_to_load_from_cache(repo_id, filename, cache_dir=str(cache_dir or hf_hub_cache()), revision=revision)
    return Path(found) if isinstance(found, str) else None


def looks_like_path(value: str) -> bool:
    """True for values meant as local paths (absolute, ~, ./ or ../, or an existing path), not hub ids or tags."""
    return (os.path.exists(os.path.expanduser(value)) or value.startswith(("/", "~", "./", "../", ".\\"))
            or os.path.isabs(value))


@dataclass
class Lookup:
    """One pretrained part's search: each place looked is recorded for the final message."""

    what: str
    config_key: str
    expected: str
    hint: str = ""
    looked: list[str] = field(default_factory=list)

    def explicit(self, value: Optional[PathLike], kind: str = "file", unset: str = "not set") -> Optional[Path]:
        """The explicit path when set; a set path that does not exist stops here (no fallback)."""
        if value is None or str(value) == "":
            self.looked.append(f"explicit path `{self.config_key}`: {unset}")
            return None
        path = Path(os.path.expanduser(str(value)))
        ok = path.is_dir() if kind == "dir" else path.is_file()
        if not ok:
            raise PretrainedWeightsMissing(
                f"{self.what}: the explicit path {path} given by `{self.config_key}` is not an existing {kind} "
                f"(expected: {self.expected}).")
        logger.info("%s: explicit path %s", self.what, path)
        return path

    def found(self, place: str, path: Optional[Path]) -> Optional[Path]:
        """Record a cache place; return the path when it holds the weights."""
        if path is not None:
            logger.info("%s: found in %s: %s", self.what, place, path)
            return path
        self.looked.append(place)
        return None

    def download(self, source: str, fetch: Callable[[], PathLike]) -> Path:
        """Fetch through the owning library unless offline; otherwise (or on failure) stop with the full list."""
        off = offline_variable()
        if off is not None:
            self.looked.append(f"download from {source}: skipped, offline mode ({off})")
            raise self.missing()
        logger.info("%s: not in any cache, downloading from %s", self.what, source)
        try:
            return Path(fetch())
        except Exception as e:  # the library's own error is kept as the cause
            self.looked.append(f"download from {source}: failed ({type(e).__name__}: {e})")
            raise self.missing() from e

    def missing(self) -> PretrainedWeightsMissing:
        places = "\n".join(f"  {i}. {p}" for i, p in enumerate(self.looked, 1))
        return PretrainedWeightsMissing(
            f"{self.what} not found. Looked in:\n{places}\n"
            f"Expected: {self.expected}. Set `{self.config_key}` to a local copy, or put the files in one of the "
            f"caches above (set HF_HOME / HF_HUB_CACHE or TORCH_HOME if yours is elsewhere). Downloads happen only "
            f"when none of {', '.join(OFFLINE_VARIABLES)} is set." + (f" {self.hint}" if self.hint else ""))


def _hf_snapshot(repo_id: str, required: Sequence[str], weights: Sequence[str], cache: Path) -> Optional[Path]:
    """The cached snapshot folder holding `required` and one of `weights`, or None."""
    found = [hf_cached_file(repo_id, f, cache) for f in required]
    if not all(found):
        return None
    if weights and not any(hf_cached_file(repo_id, f, cache) for f in weights):
        return None
    return found[0].parent if found else None


def _hf_download(repo_id: str, required: Sequence[str], weights: Sequence[str], optional: Sequence[str],
                 cache: Path) -> Path:
    """huggingface_hub's download (as transformers does it): required files, the first weight file the repo has."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError
    folder = None
    for f in required:
        folder = Path(hf_hub_download(repo_id, f, cache_dir=str(cache))).parent
    for f in optional:
        try:
            hf_hub_download(repo_id, f, cache_dir=str(cache))
        except EntryNotFoundError:
            pass
    for f in weights:
        try:
            return Path(hf_hub_download(repo_id, f, cache_dir=str(cache))).parent
        except EntryNotFoundError:
            continue
    if weights:
        raise FileNotFoundError(f"{repo_id} has none of {list(weights)}")
    assert folder is not None
    return folder


def resolve_hf_model(repo_id: str, *, what: str, config_key: str, explicit: Optional[PathLike] = None,
                     required: Sequence[str] = ("config.json",), weights: Sequence[str] = TRANSFORMERS_WEIGHTS,
                     optional: Sequence[str] = (), packaged: Optional[Path] = None, unset: str = "not set") -> Path:
    """A transformers model folder: explicit dir, a folder shipped in a package, the hub cache, then download."""
    expected = f"a folder with {' and '.join(required)}" + (f" and one of {', '.join(weights)}" if weights else "")
    look = Lookup(what, config_key, expected)
    path = look.explicit(explicit, kind="dir", unset=unset)
    if path is not None:
        return path
    if packaged is not None:
        ok = all((packaged / f).is_file() for f in required)
        if look.found(f"packaged copy {packaged}", packaged if ok else None):
            return packaged
    cache = hf_hub_cache()
    where = (f"Hugging Face hub cache: {hf_repo_folder(repo_id, cache)}/snapshots/<revision>/ "
             f"({', '.join(required)}; {' or '.join(weights)})")
    path = look.found(where, _hf_snapshot(repo_id, required, weights, cache))
    if path is not None:
        return path
    return look.download(f"the Hugging Face hub ({repo_id})",
                         lambda: _hf_download(repo_id, required, weights, optional, cache))


def resolve_hf_file(repo_id: str, filenames: Sequence[str], *, what: str, config_key: str,
                    explicit: Optional[PathLike] = None, unset: str = "not set",
                    fetch: Optional[Callable[[Path], PathLike]] = None,
                    extra: Sequence[tuple[str, Callable[[], Optional[Path]]]] = ()) -> Path:
    """One weight file: explicit file, the first of `filenames` in the hub cache, `extra` places, then `fetch`."""
    look = Lookup(what, config_key, f"one of {', '.join(filenames)}")
    path = look.explicit(explicit, unset=unset)
    if path is not None:
        return path
    cache = hf_hub_cache()
    where = f"Hugging Face hub cache: {hf_repo_folder(repo_id, cache)}/snapshots/<revision>/ ({' or '.join(filenames)})"
    cached = next((p for p in (hf_cached_file(repo_id, f, cache) for f in filenames) if p is not None), None)
    if look.found(where, cached):
        return cached
    for place, finder in extra:
        p = finder()
        if look.found(place, p):
            return p
    if fetch is None:
        raise look.missing()
    return look.download(f"the Hugging Face hub ({repo_id})", lambda: fetch(cache))


def resolve_torch_hub_file(url: str, *, what: str, config_key: str, explicit: Optional[PathLike] = None,
                           filename: Optional[str] = None, check_hash: bool = True, hint: str = "") -> Path:
    """A torchvision-style weight file: explicit file, `<torch hub>/checkpoints/<name>`, then torch.hub's download."""
    name = filename or os.path.basename(url)
    look = Lookup(what, config_key, name, hint)
    path = look.explicit(explicit)
    if path is not None:
        return path
    folder = torch_hub_checkpoints()
    target = folder / name
    if look.found(f"torch hub cache: {target}", target if target.is_file() else None):
        return target

    def fetch() -> Path:
        import torch.hub
        folder.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(url, str(target), hash_prefix=_hash_prefix(name) if check_hash else None)
        return target

    return look.download(url, fetch)


def _hash_prefix(name: str) -> Optional[str]:
    """torch.hub's convention: the SHA-256 prefix after the last '-' of the file stem (as in vgg16-397923af.pth)."""
    stem = name.split(".")[0]
    part = stem.rsplit("-", 1)[-1] if "-" in stem else ""
    return part if len(part) >= 8 and all(c in "0123456789abcdef" for c in part) else None


def _safetensors_first(filename: str) -> list[str]:
    """open_clip's preference: a .safetensors twin of a .bin/.pth weight file first, then the file itself."""
    from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME
    if filename == HF_WEIGHTS_NAME:
        return [HF_SAFE_WEIGHTS_NAME, filename]
    if filename.endswith((".bin", ".pth")):
        return [filename[:-4] + ".safetensors", filename]
    return [filename]


def resolve_open_clip(arch: str, version: str, *, config_key: str) -> Path:
    """OpenCLIP weights: `version` as a local file, else the pretrained tag in open_clip's caches, then its download."""
    import open_clip
    from open_clip.constants import HF_WEIGHTS_NAME
    from open_clip.pretrained import download_pretrained, get_pretrained_cfg
    what = f"OpenCLIP {arch} weights '{version}'"
    if looks_like_path(version):
        return Lookup(what, config_key, "an open_clip checkpoint file").explicit(version)
    cfg = get_pretrained_cfg(arch, version)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(arch)
        raise PretrainedWeightsMissing(f"{what}: open_clip knows no pretrained tag '{version}' for '{arch}' "
                                       f"(known: {', '.join(tags) or 'none'}); set `{config_key}` to a tag or a file.")
    url, hub = cfg.get("url", ""), cfg.get("hf_hub", "")
    url_cache = Path(os.path.expanduser(os.path.join("~", ".cache", "clip")))
    url_file = url_cache / os.path.basename(url) if url else None
    extra = [(f"open_clip download cache: {url_file}", lambda: url_file if url_file.is_file() else None)] if url_file else []
    if hub:
        repo_id, filename = os.path.split(hub)  # 'org/name/' (default file name) or 'org/name/file'
        return resolve_hf_file(repo_id, _safetensors_first(filename or HF_WEIGHTS_NAME), what=what,
                               config_key=config_key, unset=f"'{version}' is a pretrained tag, not a path",
                               extra=extra, fetch=lambda cache: download_pretrained(cfg, cache_dir=str(cache)))
    look = Lookup(what, config_key, os.path.basename(url))
    look.explicit(None, unset=f"'{version}' is a pretrained tag, not a path")
    for place, finder in extra:
        p = finder()
        if look.found(place, p):
            return p
    return look.download(url, lambda: download_pretrained(cfg, cache_dir=None))
