"""Finding users' local copies of public datasets: one root per dataset (a parameter, else an environment
variable, else the CompVis default under data/), and file lists read relative to it. Nothing is downloaded; a
missing root or list stops with a message naming the path, the config key and the variable that set it."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

import numpy as np
from torch.utils.data import Dataset

from ldm.data.folder import first_readable
from ldm.files import read_rgb8

PathLike = Union[str, os.PathLike]


class DatasetNotFound(FileNotFoundError):
    """A dataset's local copy (or one of its index files) is not where the config says."""


def dataset_root(value: Optional[PathLike], env: str, default: PathLike, what: str, key: str = "data_root",
                 env_subdir: Optional[str] = None) -> Path:
    """The dataset root: `value` (config key `key`), else $`env` (joined with `env_subdir` when the variable names
    a parent folder), else `default`; it must exist."""
    from_env = os.path.join(os.environ[env], env_subdir or "") if os.environ.get(env) else None
    source = f"`{key}` in the dataset params" if value else (f"${env}" if from_env else "the default")
    path = Path(os.path.expanduser(str(value or from_env or default)))
    if not path.is_dir():
        raise DatasetNotFound(
            f"{what}: data folder {path} (from {source}) does not exist. Put your local copy there, or set "
            f"`{key}` in the dataset's params (e.g. data.params.train.params.{key}=/path) or the environment "
            f"variable {env}. Nothing is downloaded.")
    return path


def read_file_list(path: PathLike, root: Path, what: str, key: str) -> list[Path]:
    """Non-empty lines of a text file list, as paths under `root`; missing files are reported together."""
    path = Path(os.path.expanduser(str(path)))
    if not path.is_file():
        raise DatasetNotFound(f"{what}: file list {path} does not exist; set `{key}` in the dataset's params")
    rel = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
    if not rel:
        raise DatasetNotFound(f"{what}: file list {path} is empty")
    files = [root / r for r in rel]
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise DatasetNotFound(f"{what}: {len(missing)} of the {len(files)} files listed in {path} are not under "
                              f"{root} (first: {missing[0]}); check `{key}` and the data root")
    return files


def load_rgb(path: PathLike) -> np.ndarray:
    """An image file as uint8 HWC RGB."""
    return np.asarray(read_rgb8(path))


class FileListDataset(Dataset):
    """Items read from `self.files` by `_read(i)`; an unreadable file is logged and skipped (ldm.data.folder)."""

    files: list[Path]

    def __init__(self, files: list[Path]):
        self.files = list(files)
        self.bad: set[int] = set()

    def __len__(self) -> int:
        return len(self.files)

    def _read(self, i: int) -> dict:
        raise NotImplementedError

    def __getitem__(self, i: int) -> dict:
        return first_readable(self.files, self.bad, i, self._read)
