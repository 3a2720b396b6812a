"""``python -m trainer.data.write_shards``: image TFRecord shards from a folder or a dataset.

See :mod:`trainer.data.writer` for the layout. Examples::

    python -m trainer.data.write_shards --images=photos/ --out=shards --shards=8
    python -m trainer.data.write_shards --dataset=fashion_mnist --out=shards --shards=4
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from trainer import data
from trainer.data.writer import write_arrays, write_image_folder
from trainer.errors import UserError


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m trainer.data.write_shards",
        description="Write image-classification TFRecord shards (ImageNet / TF-models layout).")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", help="a folder with one sub-folder of JPEG/PNG images per class")
    source.add_argument("--dataset", help="a built-in dataset (fashion_mnist, mnist, synthetic): "
                        "writes OUT/train-* and OUT/test-*")
    parser.add_argument("--out", required=True, help="the folder: OUT/train-* and "
                        "OUT/validation-* (--images) or OUT/test-* (--dataset)")
    parser.add_argument("--validation", type=float, default=0.1,
                        help="--images: the fraction held out as OUT/validation-* (default 0.1)")
    parser.add_argument("--shards", type=int, default=8, help="how many files (default 8)")
    parser.add_argument("--format", default="png", choices=("png", "jpeg"),
                        help="--dataset: the image encoding (default png: lossless)")
    parser.add_argument("--data_dir", default=None, help="--dataset: its files' folder")
    parser.add_argument("--examples", type=int, default=0,
                        help="--dataset: write only the first N examples of each split (0: all)")
    args = parser.parse_args(argv)
    try:
        if args.images:
            written = write_image_folder(args.images, args.out, num_shards=args.shards,
                                         validation=args.validation)
        else:
            arrays = data.load_arrays(args.dataset, data_dir=args.data_dir)
            written = []
            for split in ("train", "test"):
                keep = slice(0, args.examples or None)
                written += write_arrays(getattr(arrays, f"x_{split}")[keep],
                                        getattr(arrays, f"y_{split}")[keep],
                                        os.path.join(args.out, split), num_shards=args.shards,
                                        class_names=[str(i) for i in range(arrays.num_classes)],
                                        image_format=args.format)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    size = sum(os.path.getsize(p) for p in written)
    print(f"wrote {len(written)} files ({size / 1e6:.1f} MB): {written[0]} ... {written[-1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
