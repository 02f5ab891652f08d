"""Pack a folder of captioned images into WebDataset tar shards for `ldm.data.webdata.WebDataModuleFromConfig`.

    python scripts/make_shards.py --indir my_images/ --out shards/ [--maxcount 1000] [--manifest captions.jsonl]

Captions come as ImageCaptionFolder reads them: NAME.txt beside NAME.png, or a JSONL / CSV manifest (`file`,
`caption`, and any other fields, which become metadata). Metadata also comes from NAME.json beside the image. Each
sample holds:
- the image file's own bytes, under its extension (`jpg`, `png`, ...; nothing is re-encoded);
- `txt`, the caption;
- `json`, the metadata plus `original_width` / `original_height`, which the data module's `min_size` filter reads.
Shards are named `shard-000000.tar`, ... in `--out`. Images that do not open are listed and left out; an existing
shard is not overwritten without `--overwrite`.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ldm.data.folder import ImageCaptionFolder  # noqa: E402
from ldm.errors import InputError  # noqa: E402

logger = logging.getLogger("make_shards")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--indir", required=True, help="images with captions (NAME.txt, or --manifest)")
    p.add_argument("--out", required=True, help="folder for shard-NNNNNN.tar")
    p.add_argument("--manifest", default=None, help="JSONL / CSV manifest of file and caption (relative to --indir)")
    p.add_argument("--maxcount", type=int, default=1000, help="samples per shard")
    p.add_argument("--maxsize", type=float, default=3e9, help="bytes per shard, at most")
    p.add_argument("--shuffle", type=int, default=None, metavar="SEED",
                   help="write the samples in an order shuffled by SEED (default: the folder's sorted order); "
                        "resumable streams read shards in a per-epoch permutation but each shard in order")
    p.add_argument("--overwrite", action="store_true", help="replace shards already in --out")
    opt = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import webdataset as wds

    try:
        if opt.maxcount < 1:
            raise InputError(f"--maxcount must be at least 1, got {opt.maxcount}")
        folder = ImageCaptionFolder(opt.indir, size=None, manifest=opt.manifest)
        out = Path(opt.out)
        existing = sorted(out.glob("shard-*.tar")) if out.is_dir() else []
        if existing and not opt.overwrite:
            raise InputError(f"--out {out} already holds {len(existing)} shard(s) ({existing[0].name}, ...); "
                             f"pass --overwrite to replace them")
    except (InputError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for f in existing:
        f.unlink()
    out.mkdir(parents=True, exist_ok=True)
    written, skipped = 0, []
    with wds.ShardWriter(str(out / "shard-%06d.tar"), maxcount=opt.maxcount, maxsize=opt.maxsize,
                         verbose=0) as sink:
        order = list(range(len(folder.files)))
        if opt.shuffle is not None:
            order = [int(i) for i in np.random.default_rng(opt.shuffle).permutation(len(order))]
        for k in order:
            path, caption = folder.files[k], folder.captions[k]
            try:
                with Image.open(path) as im:
                    im.verify()
                with Image.open(path) as im:
                    width, height = im.size
            except Exception as e:  # unreadable: listed, left out
                skipped.append((path, f"{type(e).__name__}: {e}"))
                continue
            meta = dict(folder.metadata[k])
            side = path.with_suffix(".json")
            if side.is_file():
                meta.update(json.loads(side.read_text(encoding="utf-8")))
            meta.update(original_width=width, original_height=height, source=str(path.relative_to(folder.root)))
            ext = path.suffix.lower().lstrip(".").replace("jpeg", "jpg")
            sink.write({"__key__": f"{k:09d}", ext: path.read_bytes(), "txt": caption, "json": meta})
            written += 1
    shards = sorted(out.glob("shard-*.tar"))
    print(f"wrote {written} samples in {len(shards)} shard(s) to {out}" + (f"; left out {len(skipped)}:" if skipped
                                                                           else ""))
    for path, why in skipped:
        print(f"  {path}: {why}", file=sys.stderr)
    return 1 if skipped else 0


if __name__ == "__main__":
    sys.exit(main())
