"""Input pipeline img/s (issue 23): today's imagefolder pipeline and the uint8 one, side by side.

It makes an ImageNet-like JPEG folder of its own in a temporary folder (never committed):
scikit-learn's two sample photos (china.jpg, flower.jpg, shipped with scikit-learn) cropped,
rescaled to ImageNet's sizes (333-640 px wide, aspect 3:4 to 16:9), flipped and colour
jittered, saved at quality 90, a few classes; or measures ``--root DIR`` (DIR/train/<class>/*).

Each variant is timed in turn, round after round (interleaved, so a busy machine slows them
alike); a variant's img/s is its median over the rounds and a ratio is the median of the
per-round ratios. Each timed window records its conditions (``suite.noise``): a round that
other processes disturbed is counted in ``noisy_rounds``.

- per core: one process, torch threads = 1, items through a DataLoader with no workers, and
  the batch-level work that runs on the training device counted too (today: mixup/cutmix on
  float batches; new: ``BatchPrep`` (normalise, random erasing) and mixup/cutmix);
- with N workers: what a DataLoader of N worker processes delivers (batch-level work apart:
  on a GPU it runs there).

Variants: ``decode`` (PIL decode to RGB alone, a ceiling), ``rrc+flip`` and ``deit recipe``
(RandomResizedCrop 0.08-1, flip, RandAugment m9, random erasing 0.25, mixup 0.8 / cutmix 1.0:
experiments/imagenet.toml) and ``eval``, each ``today`` (float32 out of the workers,
torchvision tensor transforms per image) and ``new`` (uint8 out, PIL crop/resize/RandAugment,
JPEG draft decoding, normalisation and erasing per batch); ``new, no draft`` and ``new, tensor
ops`` (torchvision's uint8 tensor transforms instead of PIL's) show where the gain comes from.
On CUDA also ``gpu``: nvJPEG batch decode (torchvision.io.decode_jpeg(device="cuda")) with the
DeiT augmentations as v2 transforms on CUDA tensors, and ``tntbench train`` end to end on the
folder against synthetic data of the same size (``--train-models``).

    python benchmarks/bench_data.py --device cpu [--root DIR] [--json OUT] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageEnhance
from torch.utils.data import DataLoader, Dataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from suite import noise  # noqa: E402
from suite.config import DataConfig  # noqa: E402
from suite.training.data import (  # noqa: E402
    IMAGENET_MEAN,
    IMAGENET_STD,
    CheckedImageFolder,
    build_datasets,
    build_mixup,
    rgb_loader,
    train_transform,
)
from suite.training.pipeline import PilTrainTransform, batch_preps  # noqa: E402

RATIO_KEY = "deit recipe per core: new / today"
TARGET = 2.5  # issue 23: the DeiT recipe >= 2.5x today's img/s per core
DEIT = dict(
    random_resized_crop=True,
    crop_scale_min=0.08,
    hflip=True,
    randaugment=True,
    randaugment_magnitude=9,
    random_erasing=0.25,
    mixup=0.8,
    cutmix=1.0,
)
RRC_FLIP = dict(random_resized_crop=True, crop_scale_min=0.08, hflip=True)


# ---------------------------------------------------------------------------------------------
# An ImageNet-like folder from real photos


def make_folder(root: Path, n_train: int, n_val: int, classes: int, seed: int = 0) -> Path:
    """root/{train,val}/class<k>/<i>.jpg: crops of scikit-learn's sample photos (427 x 640)
    at ImageNet's sizes (width 333-640, aspect w/h 0.75-1.78, most near 4:3), jittered; made
    by a process per core (each image from its own seed: the same folder whatever the cores)."""
    tasks = [
        (root, split, i, classes, seed)
        for split, n in (("train", n_train), ("val", n_val))
        for i in range(n)
    ]
    procs = min(len(tasks) // 64 + 1, os.cpu_count() or 1)
    if procs > 1:
        import multiprocessing as mp

        with mp.get_context("fork").Pool(procs) as pool:
            pool.map(_make_image, tasks, chunksize=32)
    else:
        for t in tasks:
            _make_image(t)
    return root


_PHOTOS: list[Image.Image] = []


def _make_image(task: tuple[Path, str, int, int, int]) -> None:
    from sklearn.datasets import load_sample_images

    root, split, i, classes, seed = task
    if not _PHOTOS:  # once per process: china.jpg and flower.jpg, (427, 640, 3) each
        _PHOTOS.extend(Image.fromarray(a) for a in load_sample_images().images)
    rng = np.random.default_rng([seed, i, split == "val"])
    c = i % classes
    src = _PHOTOS[(i + c) % len(_PHOTOS)]
    sw, sh = src.size
    # crop 35-100% of each side, then rescale to an ImageNet-like size
    cw, ch = int(sw * rng.uniform(0.35, 1.0)), int(sh * rng.uniform(0.35, 1.0))
    x0, y0 = int(rng.integers(0, sw - cw + 1)), int(rng.integers(0, sh - ch + 1))
    width = int(rng.choice([rng.integers(333, 641), 500]))  # ImageNet: many 500 wide
    aspect = float(rng.choice([4 / 3, 3 / 4, rng.uniform(0.75, 1.78)]))
    size = (width, max(64, int(width / aspect)))
    im = src.crop((x0, y0, x0 + cw, y0 + ch)).resize(size, Image.Resampling.BICUBIC)
    if rng.random() < 0.5:
        im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    im = ImageEnhance.Brightness(im).enhance(rng.uniform(0.7, 1.3))
    im = ImageEnhance.Color(im).enhance(rng.uniform(0.5, 1.5))
    im = ImageEnhance.Contrast(im).enhance(rng.uniform(0.7, 1.3))
    d = root / split / f"class{c}"
    d.mkdir(parents=True, exist_ok=True)
    im.save(d / f"{i:05d}.jpg", quality=90)


# ---------------------------------------------------------------------------------------------
# Variants


@dataclass
class Variant:
    name: str
    dataset: Dataset
    batch_prep: Callable[[torch.Tensor, torch.Tensor], object] | None = None  # per batch


class DecodeOnly(Dataset):
    """PIL decode to RGB alone: the ceiling of any PIL-decoding pipeline."""

    def __init__(self, paths: list[str]) -> None:
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        rgb_loader(self.paths[i]).load()
        return torch.zeros(1), 0


def _cfg(root: str, **kw: object) -> DataConfig:
    return DataConfig(name="imagefolder", root=root, **kw)  # type: ignore[arg-type]


def variants(root: str, size: int) -> list[Variant]:
    """Each variant's dataset and its per-batch work, today's and the new pipeline's."""
    out: list[Variant] = []
    deit = _cfg(root, **DEIT)
    tr, _, _ = build_datasets(deit, size)
    out.append(Variant("decode", DecodeOnly([p for p, _ in tr.samples])))
    for label, cfg in (("rrc+flip", _cfg(root, **RRC_FLIP)), ("deit recipe", deit)):
        mix = build_mixup(cfg, len(tr.classes))
        today, _, info = build_datasets(cfg, size)
        new, _, _ = build_datasets(cfg, size, uint8=True)
        # reuse_output: as the training loop on CPU uses it (fit.build_data)
        prep = batch_preps(cfg, info.mean, info.std, info.num_classes, True)[0]

        def today_batch(x: torch.Tensor, y: torch.Tensor, mix=mix) -> object:
            return mix(x, y) if mix is not None else x

        def new_batch(x: torch.Tensor, y: torch.Tensor, prep=prep) -> object:
            return prep(x, y)  # normalise, erase, mix: one pass each over the batch

        out += [Variant(f"{label}: today", today, today_batch)]
        out += [Variant(f"{label}: new", new, new_batch)]
        if label == "deit recipe":
            # the PIL path without the reduced-scale decode, and torchvision's uint8 tensor
            # ops (what synthetic/CIFAR use) in place of PIL's: where the gain comes from
            no_draft, _, _ = build_datasets(cfg, size, uint8=True)
            no_draft.transform = with_options(no_draft.transform, draft=False)
            pil_resize, _, _ = build_datasets(cfg, size, uint8=True)
            pil_resize.transform = with_options(pil_resize.transform, pil_resize=True)
            tensor_ops = CheckedImageFolder(str(Path(root, "train")), None, False)
            from torchvision.transforms import v2

            tensor_ops.transform = v2.Compose(
                [v2.ToImage(), train_transform(cfg, size, None, IMAGENET_MEAN, IMAGENET_STD, True)]
            )
            out += [Variant(f"{label}: new, no draft", no_draft, new_batch)]
            out += [Variant(f"{label}: new, PIL resize", pil_resize, new_batch)]
            out += [Variant(f"{label}: new, tensor ops", tensor_ops, new_batch)]
    plain = _cfg(root)
    _, val_today, info = build_datasets(plain, size)
    _, val_new, _ = build_datasets(plain, size, uint8=True)
    out.append(Variant("eval: today", val_today, None))
    eval_prep = batch_preps(plain, info.mean, info.std, info.num_classes, True)[1]
    out.append(Variant("eval: new", val_new, eval_prep))
    return out


def with_options(t: PilTrainTransform, **kw: bool) -> PilTrainTransform:
    """A copy of ``t`` with some of its options changed (draft, pil_resize)."""
    t2 = PilTrainTransform.__new__(PilTrainTransform)
    t2.__dict__.update({**t.__dict__, **kw})
    return t2


# ---------------------------------------------------------------------------------------------
# Timing


def _batches(loader: DataLoader) -> Iterator:
    while True:  # endless: the timed window decides how many
        yield from loader


def time_loader(
    v: Variant, images: int, batch: int, seed: int, *, workers: int = 0
) -> tuple[float, noise.Window]:
    """img/s of ``v``'s DataLoader over ``images`` images. ``workers`` 0: per core (one process
    on one thread: loading plus the per-batch work); else what ``workers`` worker processes
    deliver after their first batch (the batch-level work apart: on a GPU it runs there)."""
    torch.manual_seed(seed)
    extra = {"prefetch_factor": 4} if workers else {}
    loader = DataLoader(v.dataset, batch_size=batch, shuffle=True, num_workers=workers, **extra)
    it = _batches(loader)
    if workers:
        next(it)  # workers started and warm
    per_batch = v.batch_prep if not workers else None
    steps: list[float] = []
    n = 0
    with noise.watch(torch.device("cpu"), children=bool(workers)) as cond:
        t0 = time.perf_counter()
        while n < images:
            s0 = time.perf_counter()
            x, y = next(it)
            if per_batch is not None:
                per_batch(x, y)
            steps.append(time.perf_counter() - s0)
            n += x.shape[0]
        elapsed = time.perf_counter() - t0
    del it, loader
    return n / elapsed, noise.judge(steps, cond[0], float(max(workers, 1)))


def interleaved(
    vs: list[Variant], rounds: int, timer: Callable[[Variant, int], tuple[float, noise.Window]]
) -> dict[str, dict]:
    """Each variant timed once per round, in turn; per variant its img/s per round."""
    res: dict[str, dict] = {v.name: {"img_per_s": [], "noisy": []} for v in vs}
    for r in range(rounds):
        order = vs if r % 2 == 0 else vs[::-1]  # alternate the order: no variant always first
        for v in order:
            rate, window = timer(v, r)
            res[v.name]["img_per_s"].append(rate)
            res[v.name]["noisy"].append(window.reason)
        print(
            f"round {r + 1}/{rounds}: "
            + ", ".join(f"{v.name} {res[v.name]['img_per_s'][-1]:.0f}" for v in vs),
            flush=True,
        )
    for d in res.values():
        d["median"] = statistics.median(d["img_per_s"])
        d["noisy_rounds"] = sum(bool(x) for x in d["noisy"])
    return res


def ratio(res: dict[str, dict], new: str, old: str) -> float:
    """The median of the per-round ratios (paired: the same round's conditions)."""
    pairs = zip(res[new]["img_per_s"], res[old]["img_per_s"], strict=True)
    return statistics.median(a / b for a, b in pairs)


# ---------------------------------------------------------------------------------------------
# CUDA: nvJPEG decode + v2 transforms on the GPU, and tntbench train end to end


def gpu_pipeline_img_per_s(root: str, size: int, batch: int, images: int) -> float:
    """Files' bytes read on the host, decoded in batches by nvJPEG, then the DeiT recipe per
    image on CUDA uint8 tensors (v2 transforms), normalised, erased and mixed per batch."""
    from torchvision.io import decode_jpeg
    from torchvision.transforms import v2

    paths = [p for p, _ in CheckedImageFolder(str(Path(root, "train")), None, False).samples]
    datas = [torch.frombuffer(bytearray(Path(p).read_bytes()), dtype=torch.uint8) for p in paths]
    cfg = _cfg(root, **DEIT)
    per_image = v2.Compose(
        [
            v2.RandomResizedCrop(size, scale=(cfg.crop_scale_min, 1.0), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.RandAugment(magnitude=cfg.randaugment_magnitude),
        ]
    )
    prep = batch_preps(cfg, IMAGENET_MEAN, IMAGENET_STD, 10)[0]
    dev = torch.device("cuda")
    labels = torch.zeros(batch, dtype=torch.long, device=dev)

    def one_batch(k: int) -> None:
        chunk = [datas[(k * batch + i) % len(datas)] for i in range(batch)]
        imgs = decode_jpeg(chunk, device=dev)  # list of uint8 (3, H, W) on the GPU
        x = torch.stack([per_image(im) for im in imgs])  # (B, 3, S, S) uint8
        prep(x, labels)  # normalise, erase, mix on the GPU

    one_batch(0)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    n = 0
    k = 1
    while n < images:
        one_batch(k)
        n += batch
        k += 1
    torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)


def train_end_to_end(root: str, model: str, workers: int, epochs: int, tmp: Path) -> dict:
    """What ``tntbench train`` runs (``fit``), untracked, of ``model`` on the JPEG folder and
    on synthetic data of the same size and image size: the last epoch's wall-clock img/s,
    compute img/s and data_wait_s."""
    from suite.config import load_config
    from suite.tracking import make_tracker
    from suite.training.fit import fit

    n = sum(1 for _ in Path(root, "train").rglob("*.jpg"))
    out: dict = {}
    for data in ("imagefolder", "synthetic"):
        sets = [f"model.name='{model}'", f"train.epochs={epochs}", "train.device='cuda'"]
        sets += ["train.batch_size=128", f"data.workers={workers}", "tracking.enabled=false"]
        # eager: compile time is not an epoch's, and four compiles would not fit the check
        sets += ["train.compile=false"]
        sets += [f"train.out_dir='{tmp}/runs'", "train.checkpoint=false"]
        if data == "imagefolder":
            sets += ["data.name='imagefolder'", f"data.root='{root}'"]
            sets += [f"data.{k}={json.dumps(v)}" for k, v in DEIT.items()]
        else:
            # at most 2,048 made in memory (4,096 at 224 px take GBs and tens of seconds)
            sets += ["data.name='synthetic'", f"data.train_size={min(n, 2048)}"]
            sets += ["data.val_size=256"]
            sets += ["data.img_size=224", "data.num_classes=10"]
        try:
            result = fit(load_config(None, sets), make_tracker(None, enabled=False), progress=False)
        except Exception as e:  # recorded, the other runs still go
            out[data] = {"error": f"{type(e).__name__}: {e}".splitlines()[0]}
            continue
        m = result.history[-1]
        keys = ("train_img_per_s_wall", "train_img_per_s", "data_wait_s", "data_wait_frac")
        out[data] = {k: m.get(k) for k in keys}
    return out


# ---------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--root", help="measure this folder (root/train/<class>/*.jpg) instead")
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--images", type=int, default=128, help="per variant per round, per core")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--train-images", type=int, default=320, help="folder made: train images")
    ap.add_argument("--val-images", type=int, default=64, help="folder made: val images")
    ap.add_argument("--train-models", default="tnt_s_patch16_224,deit_small_patch16_224")
    ap.add_argument("--train-epochs", type=int, default=2)
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_data.py: --device cuda but no CUDA device here")
    torch.set_num_threads(1)  # per core: the loop's own float work on one thread too

    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        if args.root:
            root = args.root
            if not Path(root, "val").is_dir():  # train/ alone: eval variants read it too
                root = str(Path(tmp, "root"))
                Path(root).mkdir()
                Path(root, "train").symlink_to(Path(args.root, "train").resolve())
                Path(root, "val").symlink_to(Path(args.root, "train").resolve())
        else:
            t0 = time.perf_counter()
            folder = Path(tmp, "imagenet")
            root = str(make_folder(folder, args.train_images, args.val_images, classes=8))
            print(
                f"made {args.train_images} + {args.val_images} JPEGs "
                f"in {time.perf_counter() - t0:.1f}s"
            )
        vs = variants(root, args.size)
        print(f"{len(vs[0].dataset)} training images in {root}; per core ({args.rounds} rounds)")
        per_core = interleaved(
            vs,
            args.rounds,
            lambda v, r: time_loader(v, args.images, args.batch_size, seed=r),
        )
        loaded = [v for v in vs if v.name in ("deit recipe: today", "deit recipe: new")]
        print(f"with {args.workers} workers")
        per_workers = interleaved(
            loaded,
            args.rounds,
            lambda v, r: time_loader(v, 4 * args.images, args.batch_size, r, workers=args.workers),
        )
        ratios = {
            RATIO_KEY: ratio(per_core, "deit recipe: new", "deit recipe: today"),
            "rrc+flip per core: new / today": ratio(per_core, "rrc+flip: new", "rrc+flip: today"),
            "deit recipe per core: new, no draft / today": ratio(
                per_core, "deit recipe: new, no draft", "deit recipe: today"
            ),
            "deit recipe per core: new, PIL resize / today": ratio(
                per_core, "deit recipe: new, PIL resize", "deit recipe: today"
            ),
            "deit recipe per core: new, tensor ops / today": ratio(
                per_core, "deit recipe: new, tensor ops", "deit recipe: today"
            ),
            "eval per core: new / today": ratio(per_core, "eval: new", "eval: today"),
            f"deit recipe {args.workers} workers: new / today": ratio(
                per_workers, "deit recipe: new", "deit recipe: today"
            ),
        }
        gpu: dict = {}
        if args.device == "cuda":
            gpu["gpu decode + deit recipe img/s"] = gpu_pipeline_img_per_s(
                root, args.size, 256, 20 * 256
            )
            for model in [m for m in args.train_models.split(",") if m]:
                gpu[f"train {model}"] = train_end_to_end(
                    root, model, args.workers, args.train_epochs, Path(tmp)
                )
                runs = gpu[f"train {model}"]
                walls = [runs[d].get("train_img_per_s_wall") for d in ("imagefolder", "synthetic")]
                if all(isinstance(w, (int, float)) and w > 0 for w in walls):
                    ratios[f"train {model} wall: jpeg folder / synthetic"] = walls[0] / walls[1]

    print("\nimg/s (median of rounds; noisy rounds)")
    for title, res in (("per core", per_core), (f"{args.workers} workers", per_workers)):
        for name, d in res.items():
            print(f"  {title:>10}  {name:<32} {d['median']:8.1f}   ({d['noisy_rounds']} noisy)")
    for k, v in gpu.items():
        print(f"  {k}: {v}")
    print("ratios")
    for k, v in ratios.items():
        print(f"  {k:<48} {v:5.2f}")
    met = ratios[RATIO_KEY] >= TARGET
    print(f"target: {RATIO_KEY} >= {TARGET}: {'met' if met else 'MISSED'}")
    if args.json:
        out = {
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            "device": args.device,
            "root": args.root or "generated",
            "cores": os.cpu_count(),
            "torch": torch.__version__,
            "pillow": Image.__version__,
            "load_avg_1m": os.getloadavg()[0],
            "per_core": per_core,
            "workers": {"n": args.workers, **per_workers},
            "gpu": gpu,
            "ratios": ratios,
            "target": {"key": RATIO_KEY, "min": TARGET, "met": met},
        }
        Path(args.json).write_text(json.dumps(out, indent=1, default=_json_default) + "\n")


def _json_default(o: object) -> object:
    if isinstance(o, float) and not math.isfinite(o):
        return None
    raise TypeError(type(o).__name__)


if __name__ == "__main__":
    main()
