"""``tntbench viz``: the paper's feature figures for trained runs, TNT beside ViT/DeiT.

- Feature maps: TNT's pixel tokens laid back onto the image grid (patch x pixel positions,
  (B*N, P, c) -> (B, c, g*pg, g*pg)); ViT/DeiT's patch tokens on the patch grid ((B, D, g, g)).
  One PNG per image: rows are layers, columns the image and a few channels per run.
- t-SNE (scikit-learn) of the patch tokens of each layer, one panel per run, colored by class.
- Spread of those patch features as numbers (logged as run metrics), so "more diverse" is a
  figure a reader can compare, not only a picture.

Layer L means the tokens after block L (layer 0: the embeddings entering block 1).
"""

from __future__ import annotations

import math
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from suite.errors import UserError
from suite.models import TNT, check_model_config
from suite.plots import pyplot
from suite.tracking import Tracker


@dataclass
class VizRun:
    run_id: str
    label: str  # "tnt_nano 1a2b3c4d"
    model: nn.Module
    val: torch.utils.data.Dataset
    classes: tuple[str, ...]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    digest: str

    @property
    def depth(self) -> int:
        return len(self.model.blocks)


@dataclass
class VizResult:
    out: Path
    figures: list[Path] = field(default_factory=list)
    spread: dict[str, dict[int, dict[str, float]]] = field(default_factory=dict)  # run, layer
    labels: dict[str, str] = field(default_factory=dict)  # run ID -> "model runid8"


@dataclass(frozen=True)
class VizOptions:
    """What ``run_viz`` draws: ``tntbench viz``'s options."""

    n_images: int = 64  # validation images, the same for every run
    layers: str | None = None  # "1,6,12" (``parse_layers``; default: first, middle, last)
    channels: int = 4  # channels shown per run in a feature map
    n_maps: int = 4  # images given a feature-map PNG
    max_points: int = 2000  # patch features sampled for t-SNE and the spread metrics
    device: str = "cpu"


# ---------------------------------------------------------------------------------------------
# Token layouts


def pixel_map(pixel: Tensor, batch: int, grid: int) -> Tensor:
    """TNT pixel tokens (B*N, P, c) -> an image-grid map (B, c, g*pg, g*pg).

    Patches are row-major over the (g, g) patch grid and pixels row-major inside each patch
    (PixelEmbed's order), so pixel (u, v) of patch (r, s) lands at (r*pg + u, s*pg + v).
    """
    _, P, c = pixel.shape
    pg = math.isqrt(P)
    x = pixel.reshape(batch, grid, grid, pg, pg, c)  # (B, r, s, u, v, c)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(batch, c, grid * pg, grid * pg)


def patch_map(tokens: Tensor, grid: int) -> Tensor:
    """Patch tokens without prefix (B, N, D) -> (B, D, g, g), row-major like PatchEmbed."""
    B, N, D = tokens.shape
    return tokens.transpose(1, 2).reshape(B, D, grid, grid)


@torch.no_grad()
def extract(model: nn.Module, x: Tensor, layers: list[int]) -> dict[int, tuple[Tensor, Tensor]]:
    """For each layer: (feature map (B, C, H', W'), patch features (B, N, D)).

    TNT's map is pixel-level, ViT's patch-level; the patch features drop class/dist tokens.
    """
    inter = model.forward_intermediates(x, layers)
    out = {}
    for layer, t in inter.items():
        if isinstance(model, TNT):
            pixel, patch = t
            feats = patch[:, 1:]  # (B, N, D) without the class token
            out[layer] = (pixel_map(pixel, x.shape[0], model.pixel_embed.grid), feats)
        else:
            feats = t[:, model.num_prefix :]  # without class (and distillation) tokens
            out[layer] = (patch_map(feats, model.patch_embed.grid), feats)
    return out


def spread(features: Tensor) -> dict[str, float]:
    """How spread out features (n, D) are, scale-free: each model's features are divided by
    their mean norm first, so models with different widths and scales compare.

    mean_pdist: mean Euclidean distance between two different points (0 = all the same).
    dim_std: mean per-dimension std times sqrt(D) (about the spread around the centroid
    relative to the typical norm; 1 would be zero-mean isotropic features).
    """
    f = features.double()
    f = f / f.norm(dim=1).mean().clamp_min(1e-12)
    n, D = f.shape
    d = torch.cdist(f, f)
    mean_pdist = d.sum() / max(n * (n - 1), 1)
    return {
        "mean_pdist": float(mean_pdist),
        "dim_std": float(f.std(dim=0).mean() * math.sqrt(D)),
    }


# ---------------------------------------------------------------------------------------------
# Loading runs


def load_run(tracker: Tracker, run_id: str, device: torch.device) -> VizRun:
    """The model of a run's best (else last) checkpoint, with its dataset's validation split."""
    from suite.config import from_dict
    from suite.models import model_img_size
    from suite.training.checkpoint import checkpoint_model
    from suite.training.data import build_datasets

    ckpt, ckpt_path = _checkpoint(tracker, run_id)
    try:
        raw = tomllib.loads(ckpt["config_toml"])
        name = str(ckpt["model_name"])
    except (KeyError, TypeError, ValueError, tomllib.TOMLDecodeError) as e:
        raise UserError(
            f"checkpoint {ckpt_path}: not a tntbench training checkpoint ({e})"
        ) from None
    cfg = from_dict(raw, source=str(ckpt_path), check_paths=False)
    check_model_config(cfg.model.name, cfg.model.overrides)
    model = checkpoint_model(ckpt, ckpt_path, name)
    model.to(device)  # checkpoint_model returns it in eval mode
    _, val, info = build_datasets(cfg.data, model_img_size(cfg.model.name, cfg.model.overrides))
    label = f"{ckpt['model_name']} {run_id[:8]}"
    return VizRun(run_id, label, model, val, info.classes, info.mean, info.std, info.digest)


def _checkpoint(tracker: Tracker, run_id: str) -> tuple[dict[str, Any], Path]:
    """The run's best (else last) checkpoint in its ``checkpoint_dir``, else its logged
    ``checkpoints/best.pt`` artifact; with the path messages name."""
    from suite.training.checkpoint import load_checkpoint

    try:
        run = tracker.get_run(run_id)
    except Exception as e:
        raise UserError(f"run {run_id}: not found in {tracker.uri or 'the store'} ({e})") from None
    d = run.data.tags.get("checkpoint_dir")
    for name in ("best.pt", "last.pt"):
        if d and (Path(d) / name).is_file():
            # tensors and plain data only: never unpickled
            return load_checkpoint(Path(d) / name), Path(d) / name
    if "checkpoints/best.pt" not in tracker.list_artifacts(run_id, "checkpoints"):
        raise UserError(f"run {run_id}: no checkpoint (not in {d!r} nor in its artifacts)")
    # the artifact is read into memory from a temporary folder, removed at once: viz leaves
    # no copy of a checkpoint behind (~/.cache would fill with one per run viewed)
    with tempfile.TemporaryDirectory(prefix="tntbench-viz-") as tmp:
        ckpt = load_checkpoint(tracker.download_artifacts(run_id, "checkpoints/best.pt", Path(tmp)))
    return ckpt, Path(f"runs:/{run_id}/checkpoints/best.pt")


def parse_layers(text: str | None, depth: int) -> list[int]:
    """ "1,6,12" -> [1, 6, 12]; default: the first, middle and last block (the paper's 1, 6, 12)."""
    if not text:
        return sorted({1, (depth + 1) // 2, depth})
    try:
        layers = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise UserError(f"--layers {text!r}: expected comma-separated integers") from None
    bad = [v for v in layers if not 0 <= v <= depth]
    if not layers or bad:
        raise UserError(f"--layers {text!r}: layers must be in 0..{depth} (the runs' depth)")
    return layers


# ---------------------------------------------------------------------------------------------
# Figures


def top_channels(fmap: Tensor, k: int) -> list[int]:
    """The k channels whose maps vary most over space (B, C, H, W): the informative ones."""
    var = fmap.flatten(2).var(dim=2).mean(dim=0)  # (C,)
    return var.topk(min(k, var.numel())).indices.tolist()


def _normalise(m: Tensor) -> Tensor:
    """One channel's maps (B, H, W) to [0, 1] by its 1st-99th percentile over all images:
    the same scale for every image and the same convention for every model and layer."""
    lo, hi = torch.quantile(m.flatten().float(), torch.tensor([0.01, 0.99], dtype=torch.float))
    return ((m - lo) / (hi - lo).clamp_min(1e-8)).clamp(0, 1)


def feature_map_figures(
    runs: list[VizRun],
    images: tuple[Tensor, Tensor],
    feats: list[dict],
    layers: list[int],
    opts: VizOptions,
    out: Path,
) -> list[Path]:
    """One PNG for each of the first ``opts.n_maps`` images (x (B, 3, H, W) as the first run's
    transform gives it, classes y): rows = layers; columns = the image, then
    ``opts.channels`` maps per run."""
    plt = pyplot()
    x, y = images
    shown = _unnormalise(x, runs[0])
    chosen = _chosen_maps(feats, layers, opts.channels)
    ncols = 1 + sum(len(chosen[r, layers[0]][0]) for r in range(len(runs)))
    paths = []
    for i in range(min(opts.n_maps, x.shape[0])):
        fig, axes = plt.subplots(
            len(layers), ncols, figsize=(1.6 * ncols, 1.7 * len(layers)), squeeze=False
        )
        for row, layer in enumerate(layers):
            axes[row, 0].imshow(shown[i].numpy())
            axes[row, 0].set_ylabel(f"layer {layer}", fontsize=8)
            col = 1
            for r, run in enumerate(runs):
                ch, maps = chosen[r, layer]
                for j, c in enumerate(ch):
                    ax = axes[row, col]
                    ax.imshow(
                        maps[i, j].numpy(), cmap="viridis", vmin=0, vmax=1, interpolation="nearest"
                    )
                    ax.set_title(
                        f"{run.label}\nch {c}" if row == 0 and j == 0 else f"ch {c}", fontsize=7
                    )
                    col += 1
        for ax in axes.flat:
            ax.set_xticks([])
            ax.set_yticks([])
        fig.suptitle(
            f"feature maps, validation image {i} ({runs[0].classes[int(y[i])]}); TNT: pixel "
            "tokens on the image grid, ViT/DeiT: patch tokens",
            fontsize=8,
        )
        fig.tight_layout()
        paths.append(_save(fig, out / f"feature_maps_{i:02d}.png"))
    return paths


def _unnormalise(x: Tensor, run: VizRun) -> Tensor:
    """Images (B, 3, H, W) normalised by ``run``'s transform -> (B, H, W, 3) in [0, 1]."""
    mean = torch.tensor(run.mean).view(3, 1, 1)
    std = torch.tensor(run.std).view(3, 1, 1)
    return (x * std + mean).clamp(0, 1).permute(0, 2, 3, 1)


def _chosen_maps(feats: list[dict], layers: list[int], k: int) -> dict:
    """(run, layer) -> its ``k`` most varying channels, and their maps normalised
    (B, k, H, W)."""
    chosen = {}
    for r, f in enumerate(feats):
        for layer in layers:
            fmap = f[layer][0]
            ch = top_channels(fmap, k)
            chosen[r, layer] = (ch, torch.stack([_normalise(fmap[:, c]) for c in ch], dim=1))
    return chosen


def _save(fig: Any, path: Path) -> Path:
    fig.savefig(path, dpi=100)
    pyplot().close(fig)
    return path


def tsne_figure(
    runs: list[VizRun],
    points: list[dict],
    labels: list[Tensor],
    layer: int,
    spreads: list[dict],
    out: Path,
) -> Path:
    """t-SNE of each run's patch features at ``layer`` side by side, colored by image class."""
    fig = tsne_plot(runs, points, labels, layer, spreads)
    return _save(fig, out / f"tsne_layer{layer:02d}.png")


# a legend of more classes than this is a wall of text; the colors repeat past 20 anyway
MAX_LEGEND_CLASSES = 20


def tsne_plot(
    runs: list[VizRun], points: list[dict], labels: list[Tensor], layer: int, spreads: list[dict]
) -> Any:
    """The t-SNE Figure: one panel per run, colors = classes (tab20), a class legend beside."""
    from matplotlib.lines import Line2D
    from sklearn.manifold import TSNE

    plt = pyplot()
    cmap = plt.get_cmap("tab20")
    fig, axes = plt.subplots(1, len(runs), figsize=(4.2 * len(runs) + 1.6, 4.2), squeeze=False)
    for r, run in enumerate(runs):
        f = points[r][layer].numpy()
        emb = TSNE(
            2, perplexity=min(30.0, (len(f) - 1) / 3), init="pca", random_state=0, max_iter=500
        ).fit_transform(f)
        ax = axes[0, r]
        # colors by class index (not rescaled per panel): one class, one color in every panel
        ax.scatter(emb[:, 0], emb[:, 1], color=cmap(labels[r].numpy() % cmap.N), s=4, alpha=0.8)
        s = spreads[r][layer]
        ax.set_title(
            f"{run.label}, layer {layer}\nmean pdist {s['mean_pdist']:.3f}  "
            f"dim std {s['dim_std']:.3f}",
            fontsize=8,
        )
        ax.set_xticks([])
        ax.set_yticks([])
    shown = sorted({int(k) for lab in labels for k in lab.tolist()})
    classes = runs[0].classes
    names = [classes[k] if k < len(classes) else str(k) for k in shown]
    handles = [Line2D([], [], ls="", marker="o", ms=5, color=cmap(k % cmap.N)) for k in shown][
        :MAX_LEGEND_CLASSES
    ]
    title = "class" if len(shown) <= MAX_LEGEND_CLASSES else f"class (first {MAX_LEGEND_CLASSES})"
    fig.legend(handles, names[:MAX_LEGEND_CLASSES], loc="center right", fontsize=7, title=title)
    fig.suptitle("t-SNE of patch features, colored by class", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1 - 1.5 / fig.get_figwidth(), 1))
    return fig


# ---------------------------------------------------------------------------------------------
# The command


def run_viz(
    tracker: Tracker,
    run_ids: list[str],
    opts: VizOptions | None = None,
    *,
    out: str | Path | None = None,
) -> VizResult:
    """Feature maps, t-SNE and spread metrics for the runs, on the same validation images;
    the PNGs go to ``out`` (default ``reports/viz/<run ids>``) and onto each run."""
    opts = opts or VizOptions()
    dev = _check_viz_args(opts)
    runs = _load_runs(tracker, run_ids, dev)
    wanted = parse_layers(opts.layers, min(r.depth for r in runs))
    key = "-".join(r.run_id[:8] for r in runs)
    out = Path(out) if out else Path("reports") / "viz" / key
    out.mkdir(parents=True, exist_ok=True)
    _say(f"features of {min(opts.n_images, len(runs[0].val))} images, layers {wanted} ...")
    images, feats = _features(runs, opts.n_images, wanted, dev)
    points, point_labels = _sample_points(images, feats, wanted, opts.max_points)
    spreads = [{L: spread(p[L]) for L in wanted} for p in points]

    result = VizResult(out)
    _say(f"writing feature maps to {out} ...")
    result.figures += feature_map_figures(runs, images[0], feats, wanted, opts, out)
    for L in wanted:
        _say(f"t-SNE layer {L} ...")
        result.figures.append(tsne_figure(runs, points, point_labels, L, spreads, out))
    _say(f"writing metrics and {len(result.figures)} figures to the runs ...")
    _record(tracker, runs, spreads, wanted, result, key)
    return result


def _load_runs(tracker: Tracker, run_ids: list[str], dev: torch.device) -> list[VizRun]:
    """Each run once, in order; all of them trained on the same dataset."""
    runs = []
    for rid in dict.fromkeys(run_ids):
        _say(f"loading {rid} ...")
        runs.append(load_run(tracker, rid, dev))
    if len({r.digest for r in runs}) > 1:
        raise UserError(
            "runs were trained on different datasets ("
            + ", ".join(f"{r.label}: {r.digest}" for r in runs)
            + "); viz compares models on the same images"
        )
    return runs


def _sample_points(
    images: list[tuple[Tensor, Tensor]], feats: list[dict], wanted: list[int], max_points: int
) -> tuple[list[dict], list[Tensor]]:
    """Per run, every patch token of the n images, a fixed subsample of ``max_points`` (for
    t-SNE and the spread): {layer: features (k, D)}, and each token's image class (k,)."""
    points, labels = [], []
    gen = torch.Generator().manual_seed(0)
    for (_, y), f in zip(images, feats, strict=True):
        n, N = f[wanted[0]][1].shape[:2]
        pick = torch.randperm(n * N, generator=gen)[:max_points]
        points.append({L: f[L][1].reshape(n * N, -1)[pick] for L in wanted})
        labels.append(y.repeat_interleave(N)[pick])
    return points, labels


def _say(stage: str) -> None:
    """A stage line on stderr, so a long viz never goes quiet."""
    print(f"viz: {stage}", file=sys.stderr, flush=True)


def _check_viz_args(opts: VizOptions) -> torch.device:
    """The device to run on; a UserError naming an option out of range."""
    if opts.n_images < 2:
        raise UserError(f"--images {opts.n_images}: need at least 2 images")
    if opts.channels < 1 or opts.n_maps < 0:
        raise UserError(
            f"--channels {opts.channels} / --maps {opts.n_maps}: need >= 1 channel, >= 0 maps"
        )
    if opts.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {opts.device}: no CUDA device is available")
    try:
        return torch.device(opts.device)
    except RuntimeError:
        raise UserError(f"--device {opts.device!r}: expected cpu or cuda[:N]") from None


def _features(runs: list[VizRun], n_images: int, wanted: list[int], dev: torch.device) -> tuple:
    """The same N validation images for every run (a fixed random sample): per run (x, y) and
    {layer: (feature map (n, C, H', W'), patch features (n, N, D))}."""
    n = min(n_images, len(runs[0].val))
    idx = torch.randperm(len(runs[0].val), generator=torch.Generator().manual_seed(0))[:n]
    images, feats = [], []  # per run: (x, y), {layer: (map (n, C, H', W'), feats (n, N, D))}
    for run in runs:
        xs, ys = zip(*(run.val[int(i)] for i in idx), strict=True)
        x, y = torch.stack(xs), torch.tensor(ys)
        chunks = [extract(run.model, x[j : j + 64].to(dev), wanted) for j in range(0, n, 64)]
        f = {
            L: tuple(torch.cat([c[L][k] for c in chunks]).float().cpu() for k in (0, 1))
            for L in wanted
        }
        images.append((x, y))
        feats.append(f)
    return images, feats


def _record(
    tracker: Tracker,
    runs: list[VizRun],
    spreads: list[dict],
    wanted: list[int],
    result: VizResult,
    key: str,
) -> None:
    """Spread metrics, tags and the figures onto each run."""
    for r, run in enumerate(runs):
        result.spread[run.run_id] = spreads[r]
        result.labels[run.run_id] = run.label
        tr = tracker.attach(run.run_id)
        tr.log_metrics({f"viz_layer{L}_{k}": v for L in wanted for k, v in spreads[r][L].items()})
        tr.set_tags(
            {
                "viz_compared_with": " ".join(o.run_id for o in runs if o is not run),
                "viz_time": time.strftime("%Y-%m-%d %H:%M:%S"),
            }
        )
        for p in result.figures:
            tr.log_artifact(p, f"viz/{key}")


def format_viz(res: VizResult) -> str:
    lines = [f"{'run':34s} {'layer':>5s} {'mean_pdist':>10s} {'dim_std':>8s}"]
    for rid, by_layer in res.spread.items():
        for L, s in by_layer.items():
            name = res.labels.get(rid, rid)
            lines.append(f"{name:34s} {L:5d} {s['mean_pdist']:10.4f} {s['dim_std']:8.4f}")
    lines.append(f"{len(res.figures)} figures in {res.out.resolve()}")
    return "\n".join(lines)
