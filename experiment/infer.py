"""Run a segmentation checkpoint on your own images (no ground truth needed).

    python -m experiment.infer --model_path checkpoints/hrnet18_IF_checkpoint.pth --has_edge True \\
        --input photos/ --output_dir runs/infer
    torchrun --nproc_per_node=8 experiment/infer.py --model_path ... --input list.txt --output_dir ...

``--input`` is an image file, a folder (searched recursively for PNG/JPEG) or a text file
listing image paths (one per line, relative to the list's folder; ``#`` at the start of a line or after a blank
starts a comment, ``\\#`` is a literal ``#``).
Images keep their own size; grayscale, RGBA and 16-bit images are converted to 8-bit RGB with
a notice.  For each image, under ``OUTPUT_DIR`` at the image's relative path:
``<stem>_labelIds.png`` (the stored label ids of the model's class table: for Cityscapes what the
official tools read), ``<stem>_color.png`` (the table's colours), ``<stem>_overlay.png`` (the
colours blended over the image) and, with an edge head, ``<stem>_edge.png`` (edge probability x 255).
The class table: ``--class_table`` (a YAML, docs/datasets.md), else NYUv2-40 with
``--dataset nyu``, else the one the checkpoint or model folder records, else Cityscapes' for
19 classes, else numbered classes in the VOC palette.

An unreadable image (or one the network cannot take, e.g. a 1-pixel strip) gets one error line
naming it; the others are still processed, then the number of failures is reported and the exit
status is non-zero.  Same-size images are batched
(``--batch_size``); under torchrun each process takes a contiguous share of the images.
``--sliding_window``, ``--flip`` and ``--scales`` select the inference mode as in
``experiment.validation`` (see ``experiment/tta.py``; HMS keeps its attention scales).
"""
from __future__ import annotations

import argparse
import collections
import logging
import os
import re
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Deque, Dict, List, Optional, Sequence, Tuple

if __package__ in (None, ""):  # run as a script (torchrun experiment/infer.py)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cv2
import numpy as np
import torch
from tqdm import tqdm

from datasets import NUM_CLASSES, ClassTable, nyu40_class_table
from datasets.transforms import normalize_image
from experiment.cli import (AMP_CHOICES, INFERENCE_FLAGS, add_inference_arguments, explicit_keys, flag_overrides,
                            script_main, str2bool)
from experiment.acceleration import evaluation_amp, place_model, to_device_images
from experiment.errors import UserError
from experiment.evaluation import too_small_for_the_network
from experiment.network import MODEL_KEYS, describe_from_checkpoint, load_model, read_model_file
from experiment.pictures import edge_image, write_png
from experiment.run_config import load_run_config
from experiment.run_dir import holding
from experiment.runtime import autocast, on_main_first
from experiment.tta import inference_mode_from_config, predict
from utils import dist
from utils.config import add_config_arguments

log = logging.getLogger("experiment.infer")

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")


# ----------------------------------------------------------------------------- inputs
def _is_image_name(path: str) -> bool:
    return path.lower().endswith(IMAGE_EXTENSIONS)


def find_images(source: str) -> List[Tuple[str, str]]:
    """(path, relative path kept in the output) of every image named by ``source``: an image
    file, a folder searched recursively, or a text file listing paths.  Listed files are kept
    even when missing (they fail, by name, when read); a source with no image is an error."""
    if not os.path.exists(source):
        raise UserError(f"--input {source} does not exist (expected an image, a folder or a text file of paths)")
    if os.path.isdir(source):
        found = _folder_images(source)
        if not found:
            raise UserError(f"--input folder {source} holds no PNG/JPEG image ({', '.join(IMAGE_EXTENSIONS)})")
        return sorted(found, key=lambda item: item[1])
    if _is_image_name(source):
        return [(source, os.path.basename(source))]
    return _read_list(source)


def _folder_images(source: str) -> List[Tuple[str, str]]:
    """Images below ``source``, following links to folders, each folder once (a link back up
    the tree would otherwise repeat the same images until the kernel's path limit)."""
    found, seen = [], set()
    for folder, subdirs, files in os.walk(source, followlinks=True):
        stat = os.stat(folder)
        if (stat.st_dev, stat.st_ino) in seen:
            log.warning("--input: %s leads back to a folder already searched (a link loop): skipped", folder)
            subdirs.clear()
            continue
        seen.add((stat.st_dev, stat.st_ino))
        subdirs.sort()
        for name in sorted(files):
            if _is_image_name(name) and not name.startswith("."):
                path = os.path.join(folder, name)
                found.append((path, os.path.relpath(path, source)))
    return found


def _without_comment(line: str) -> str:
    """A list line without its comment: ``#`` at the start or after a blank starts one, as in a
    shell; a ``#`` inside a name is kept, and ``\\#`` is a literal ``#`` anywhere."""
    text = re.split(r"(?:^|(?<=\s))(?<!\\)#", line, maxsplit=1)[0]
    return text.replace("\\#", "#").strip()


def _read_list(list_path: str) -> List[Tuple[str, str]]:
    base = os.path.dirname(os.path.abspath(list_path))
    try:
        with open(list_path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except UnicodeDecodeError:
        raise UserError(f"--input {list_path} is neither a PNG/JPEG image (by its extension) nor a text file "
                        "listing image paths") from None
    paths = []
    for number, line in enumerate(lines, 1):
        entry = _without_comment(line)
        if not entry:
            continue
        if not _is_image_name(entry):
            raise UserError(f"--input {list_path} line {number}: {entry!r} is not a .png/.jpg/.jpeg path")
        paths.append(os.path.normpath(os.path.join(base, entry)))
    if not paths:
        raise UserError(f"--input list {list_path} names no image")
    # Keep the folder structure below the listed images' common folder.
    root = os.path.commonpath([os.path.dirname(p) for p in paths])
    return [(p, os.path.relpath(p, root)) for p in paths]


def output_stem(relative_path: str) -> str:
    return os.path.splitext(relative_path)[0]


def check_unique_outputs(images: Sequence[Tuple[str, str]]) -> None:
    """Two inputs whose outputs would overwrite each other (a.png and a.jpg in one folder)
    are refused before anything is written."""
    seen: Dict[str, str] = {}
    for path, rel in images:
        stem = output_stem(rel)
        if stem in seen:
            raise UserError(f"{seen[stem]} and {path} would both write {stem}_*.png; rename one of them")
        seen[stem] = path


def output_paths(out_dir: str, rel: str, with_edges: bool) -> List[str]:
    stem = os.path.join(out_dir, output_stem(rel))
    suffixes = ("_labelIds.png", "_color.png", "_overlay.png") + (("_edge.png",) if with_edges else ())
    return [stem + suffix for suffix in suffixes]


def check_outputs_free(out_dir: str, images: Sequence[Tuple[str, str]], with_edges: bool, overwrite: bool,
                       source: str) -> None:
    """Outputs inside the input folder are refused (a later run would read them as images), and
    files of an earlier run (or the user's own) at the paths this run writes, naming the first,
    unless ``overwrite``."""
    if os.path.isdir(source):
        inside = os.path.realpath(out_dir) + os.sep
        if inside.startswith(os.path.realpath(source) + os.sep):
            raise UserError(f"--output_dir {out_dir} is inside --input {source}: its PNGs would be read as images "
                            "by the next run; choose a folder outside it")
    if overwrite:
        return
    taken = [p for _, rel in images for p in output_paths(out_dir, rel, with_edges) if os.path.lexists(p)]
    if taken:
        raise UserError(f"--output_dir {out_dir} already holds {len(taken)} of the files this run writes (e.g. "
                        f"{taken[0]}); choose another --output_dir, or pass --overwrite to replace them")


def read_rgb(path: str) -> Tuple[np.ndarray, Optional[str]]:
    """H x W x 3 uint8 RGB and a notice when the file had to be converted (grayscale, RGBA,
    16-bit).  The pixels are taken as stored (EXIF orientation is not applied), so outputs
    line up with the file's pixel grid.  Raises OSError naming what is wrong."""
    if not os.path.isfile(path):
        raise OSError("file not found")
    raw = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    if raw is None:
        raise OSError("unreadable, truncated or not a PNG/JPEG image")
    notes = []
    if raw.dtype == np.uint16:
        raw = (raw // 257).astype(np.uint8)
        notes.append("16-bit, scaled to 8-bit")
    elif raw.dtype != np.uint8:
        raise OSError(f"unsupported pixel type {raw.dtype}")
    if raw.ndim == 2 or (raw.ndim == 3 and raw.shape[2] == 1):
        rgb = cv2.cvtColor(raw.reshape(raw.shape[:2]), cv2.COLOR_GRAY2RGB)
        notes.append("grayscale, converted to RGB")
    elif raw.ndim == 3 and raw.shape[2] == 4:
        rgb = cv2.cvtColor(raw, cv2.COLOR_BGRA2RGB)
        notes.append("RGBA, alpha channel dropped")
    elif raw.ndim == 3 and raw.shape[2] == 3:
        rgb = cv2.cvtColor(raw, cv2.COLOR_BGR2RGB)
    else:
        raise OSError(f"unsupported image layout {raw.shape}")
    return rgb, ("; ".join(notes) if notes else None)


class ImageFiles(torch.utils.data.Dataset):
    """Decodes and normalises one image per item (in loader workers); a failure becomes an
    ``error`` entry instead of an exception, so one bad file does not stop the others."""

    def __init__(self, images: Sequence[Tuple[str, str]]):
        self.images = list(images)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        path, rel = self.images[index]
        item: Dict[str, Any] = {"path": path, "rel": rel, "error": None, "notice": None}
        try:
            rgb, item["notice"] = read_rgb(path)
        except (OSError, cv2.error) as exc:
            item["error"] = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
            return item
        item["rgb"] = rgb
        item["image"] = normalize_image(rgb)
        return item


def _as_list(items: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    return items


class SizeBatcher:
    """Groups same-size images into batches of at most ``batch_size``, whatever their order;
    holds at most ``4 * batch_size`` images back (then the largest group goes as it is)."""

    def __init__(self, batch_size: int):
        self.batch_size = batch_size
        self.pending: Dict[Tuple[int, int], List[Dict[str, Any]]] = {}

    def add(self, item: Dict[str, Any]) -> List[List[Dict[str, Any]]]:
        key = tuple(item["image"].shape[-2:])
        group = self.pending.setdefault(key, [])
        group.append(item)
        ready = []
        if len(group) >= self.batch_size:
            ready.append(self.pending.pop(key))
        if sum(len(g) for g in self.pending.values()) >= 4 * self.batch_size:
            largest = max(self.pending, key=lambda k: len(self.pending[k]))
            ready.append(self.pending.pop(largest))
        return ready

    def flush(self) -> List[List[Dict[str, Any]]]:
        ready = list(self.pending.values())
        self.pending = {}
        return ready


# ----------------------------------------------------------------------------- outputs
def overlay_image(rgb: np.ndarray, color: np.ndarray, alpha: float) -> np.ndarray:
    """The class colours blended over the image with weight ``alpha``."""
    return cv2.addWeighted(color, alpha, rgb, 1.0 - alpha, 0.0)


def output_class_table(cfg: Any, state: Any) -> ClassTable:
    """The classes whose colours and label ids the outputs use (module docstring)."""
    if cfg.data.class_table:
        table = ClassTable.from_yaml(cfg.data.class_table)
    elif cfg.data.dataset == "nyu":
        table = nyu40_class_table()
    elif isinstance(state, dict) and isinstance(state.get("class_table"), dict):
        table = ClassTable.from_dict(state["class_table"], source="the model file's class table")
    elif cfg.model.num_classes == NUM_CLASSES:
        table = ClassTable.cityscapes()
    else:
        table = ClassTable([f"class {i}" for i in range(cfg.model.num_classes)], source="numbered classes")
    if table.num_classes != cfg.model.num_classes:
        raise UserError(f"the class table {table.source} has {table.num_classes} classes but the model predicts "
                        f"{cfg.model.num_classes}; pass the model's own table with --class_table")
    return table


def write_outputs(out_dir: str, rel: str, rgb: np.ndarray, pred: np.ndarray, edge_prob: Optional[np.ndarray],
                  alpha: float, table: ClassTable) -> None:
    paths = output_paths(out_dir, rel, edge_prob is not None)
    os.makedirs(os.path.dirname(paths[0]), exist_ok=True)
    color = table.colorize(pred)
    write_png(paths[0], table.to_label_ids(pred))
    write_png(paths[1], color)
    write_png(paths[2], overlay_image(rgb, color, alpha))
    if edge_prob is not None:
        write_png(paths[3], edge_image(edge_prob))


# ----------------------------------------------------------------------------- running
def shard(items: Sequence[Any], rank: int, world_size: int) -> List[Any]:
    """The contiguous share of ``items`` of one process (every item exactly once)."""
    n = len(items)
    return list(items[rank * n // world_size:(rank + 1) * n // world_size])


class _Segmenter:
    """The forward passes of one process's images, their failures, and their PNGs written by two
    threads beside the next forward (at most a few batches wait in memory)."""

    def __init__(self, net: torch.nn.Module, cfg: Any, device: torch.device, amp_dtype, inference,
                 overlay_alpha: float, bar, table: ClassTable):
        self.net, self.cfg, self.device, self.amp_dtype, self.table = net, cfg, device, amp_dtype, table
        self.inference, self.alpha, self.bar = inference, overlay_alpha, bar
        self.failed: List[Tuple[str, str]] = []
        self.written = 0
        self.pool = ThreadPoolExecutor(max_workers=2)
        self.pending: Deque[Future] = collections.deque()

    def unreadable(self, item: Dict[str, Any]) -> None:
        log.error("cannot read image %s: %s", item["path"], item["error"])
        self.failed.append((item["path"], item["error"]))
        self.bar.update(1)

    def segment(self, batch: List[Dict[str, Any]]) -> None:
        images = to_device_images(torch.stack([item["image"] for item in batch]), self.device)
        try:
            with torch.no_grad(), autocast(self.device, self.amp_dtype):
                out = predict(self.net, images, self.inference)
            preds = out["pred"].argmax(1).to(torch.uint8).cpu().numpy()
        except RuntimeError as exc:  # an image too small for the network (or an HMS scale): the others go on
            if not too_small_for_the_network(exc):
                raise  # out of memory, a CUDA error, a bug: not a property of one image
            reason = str(exc).strip().splitlines()[0]
            for item in batch:
                log.error("cannot segment image %s (%dx%d): %s", item["path"], *images.shape[-2:], reason)
                self.failed.append((item["path"], reason))
            self.bar.update(len(batch))
            return
        edge = out.get("edge_prob")
        edges = edge[:, 0].float().cpu().numpy() if edge is not None else None
        for i, item in enumerate(batch):
            self.pending.append(self.pool.submit(write_outputs, self.cfg.output_dir, item["rel"], item["rgb"],
                                                 preds[i], None if edges is None else edges[i], self.alpha,
                                                 self.table))
        while len(self.pending) > 4 * max(2, self.cfg.val.batch_size):
            self.pending.popleft().result()
        self.written += len(batch)
        self.bar.update(len(batch))

    def close(self) -> None:
        """Wait for every write: a failed one (disk full, permissions) stops the run here."""
        try:
            for future in self.pending:
                future.result()
        finally:
            self.pool.shutdown(wait=True)


def run_inference(cfg: Any, model_path: str, source: str, ctx: dist.DistContext, overlay_alpha: float = 0.5,
                  progress: bool = True, overwrite: bool = False, state: Any = None) -> Dict[str, Any]:
    """Predict every image of ``source`` and write its PNGs under ``cfg.output_dir``.  Returns
    counts and timing (summed over processes); failures are listed in ``failed``.  ``state``: the
    model file's contents, if already read."""
    if not 0.0 <= overlay_alpha <= 1.0:
        raise UserError(f"--overlay_alpha must be in [0, 1], got {overlay_alpha}")
    images = find_images(source)
    check_unique_outputs(images)
    with holding(cfg.output_dir):
        on_main_first(lambda: check_outputs_free(cfg.output_dir, images, cfg.model.has_edge, overwrite, source))
        return _segment_all(cfg, model_path, source, images, ctx, overlay_alpha, progress, state)


def _segment_all(cfg: Any, model_path: str, source: str, images, ctx: dist.DistContext, overlay_alpha: float,
                 progress: bool, state: Any) -> Dict[str, Any]:
    inference = inference_mode_from_config(cfg.val, cfg.model)
    state = read_model_file(model_path, "model file") if state is None else state
    table = output_class_table(cfg, state)
    net = load_model(cfg, state, model_path)
    device = ctx.device
    place_model(net, device).eval()  # channels_last on CUDA
    amp_dtype = evaluation_amp(cfg, device)  # as validation's
    mine = shard(images, ctx.rank, ctx.world_size)
    # OpenCV's own decoder messages would duplicate (less clearly) the one error line per file below.
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
    log.info("%d images from %s on %d process(es), device %s, amp %s, batch %d, inference: %s", len(images), source,
             ctx.world_size, device, amp_dtype or "off", cfg.val.batch_size, inference.describe())
    loader = torch.utils.data.DataLoader(ImageFiles(mine), batch_size=1, shuffle=False,
                                         num_workers=cfg.val.num_workers, collate_fn=_as_list)
    batcher = SizeBatcher(cfg.val.batch_size)
    bar = tqdm(total=len(mine), desc="inference", unit="img", dynamic_ncols=True,
               disable=not (progress and ctx.is_main))
    start = time.time()
    segmenter = _Segmenter(net, cfg, device, amp_dtype, inference, overlay_alpha, bar, table)
    try:
        for (item,) in loader:
            if item["error"] is not None:
                segmenter.unreadable(item)
                continue
            if item["notice"]:
                log.warning("%s: %s", item["path"], item["notice"])
            for batch in batcher.add(item):
                segmenter.segment(batch)
        for batch in batcher.flush():
            segmenter.segment(batch)
    finally:
        segmenter.close()
        bar.close()
    return _summary(cfg, images, segmenter, time.time() - start, inference.describe(), device)


def _summary(cfg: Any, images, segmenter: _Segmenter, elapsed: float, mode: str, device: torch.device
             ) -> Dict[str, Any]:
    """Counts and timing summed over processes."""
    counts = dist.all_reduce(torch.tensor([segmenter.written, len(segmenter.failed)], dtype=torch.float64,
                                          device=device)).cpu()
    elapsed_max = dist.all_reduce(torch.tensor([elapsed], dtype=torch.float64, device=device), op="max").item()
    all_failed = [f for rank_failed in dist.all_gather_object(segmenter.failed) for f in rank_failed]
    return {"images": len(images), "written": int(counts[0]), "failed": all_failed,
            "seconds": round(elapsed_max, 3),
            "images_per_second": round(counts[0].item() / elapsed_max, 3) if elapsed_max > 0 else None,
            "inference": mode, "output_dir": cfg.output_dir}


# ----------------------------------------------------------------------------- command line
FLAGS = {"output_dir": "output_dir", "device": "train.device", "class_table": "data.class_table",
         "dataset": "data.dataset", "arch": "model.arch", "hrnet_base": "model.hrnet_base",
         "has_edge": "model.has_edge", "batch_size": "val.batch_size", "num_workers": "val.num_workers",
         "amp": "val.amp", **INFERENCE_FLAGS}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(p)
    p.add_argument("--input", required=True, help="an image, a folder (recursive) or a text file of image paths")
    p.add_argument("--output_dir", help="where the PNGs go, keeping --input's folder structure (default runs/infer)")
    p.add_argument("--model_path", required=True, help="checkpoint (released .pth or one of ours, which describes "
                                                       "its model: --arch etc. are needed only for the released files)")
    p.add_argument("--arch", help="ocrnet.AuxHRNet | lighthrnet.HRNet16 | ocrnet.HRNet | ocrnet.HRNet_Mscale")
    p.add_argument("--hrnet_base", type=int, help="trunk width: 16, 18 or 48 (default: the arch's own)")
    p.add_argument("--has_edge", type=str2bool, help="build the edge head and write <stem>_edge.png (True/False)")
    p.add_argument("--batch_size", type=int, help="same-size images per forward pass (val.batch_size)")
    p.add_argument("--num_workers", type=int, help="image-decoding workers per process (val.num_workers)")
    p.add_argument("--amp", choices=AMP_CHOICES,
                   help="autocast (val.amp): auto (as validation: off on CPU; on CUDA bf16 only for the archs "
                        "where it was measured faster than fp32, see experiment/acceleration.py), on (=bf16), off, "
                        "bf16, fp16")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), help="default: CUDA when available")
    p.add_argument("--class_table", "--class-table", dest="class_table",
                   help="the classes' names, colours and label ids (YAML; default: the model file's, else "
                        "Cityscapes for 19 classes)")
    p.add_argument("--dataset", choices=("cityscapes", "nyu"), help="nyu: the NYUv2-40 class table")
    add_inference_arguments(p)
    p.add_argument("--overlay_alpha", type=float, default=0.5, help="weight of the colours in the overlay")
    p.add_argument("--overwrite", action="store_true",
                   help="replace output files of an earlier run (without it, a file this run would write is refused)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def config_from_args(args: argparse.Namespace) -> Any:
    """The config, with the model the checkpoint describes (read once, kept in ``args.model_state``)."""
    args.model_state = read_model_file(args.model_path, "model file")
    cfg = load_run_config(args.config, flag_overrides(args, FLAGS), defaults={"output_dir": "runs/infer"})
    describe_from_checkpoint(cfg, args.model_state, args.model_path,
                             explicit_keys(args.config, args.opt, FLAGS, args, "model", MODEL_KEYS))
    return cfg


def main(argv: Optional[List[str]] = None) -> None:
    args = build_parser().parse_args(argv)

    def body(cfg: Any, ctx: dist.DistContext) -> None:
        summary = run_inference(cfg, args.model_path, args.input, ctx, overlay_alpha=args.overlay_alpha,
                                overwrite=args.overwrite, state=args.model_state)
        if ctx.is_main:
            print(f"{summary['written']} images in {summary['seconds']:.1f}s ({summary['images_per_second']} "
                  f"images/s), inference: {summary['inference']}; outputs: {summary['output_dir']}")
        if summary["failed"]:
            names = [path for path, _ in summary["failed"]]
            shown = ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")
            raise UserError(f"{len(names)} of {summary['images']} images could not be read or segmented (the "
                            f"others were written): {shown}")

    script_main(args, config_from_args, body, "infer_log.txt")


if __name__ == "__main__":
    main()
