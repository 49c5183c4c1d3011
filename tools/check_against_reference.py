#!/usr/bin/env python
"""Check models/ against the reference implementation, on synthetic weights.

    python tools/check_against_reference.py --reference-dir /path/to/InverseForm

``--reference-dir`` is a clone of Qualcomm-AI-research/InverseForm (the fixture
was made from commit d5fec5b).  Its model code is imported and run UNCHANGED in
a child process; only the environment around it is shimmed (written by this
script to a temporary directory):

* ``apex``, ``runx``, ``torchvision`` and ``tabulate`` are replaced by empty
  stand-ins (they are imported by the reference but not needed to build or run
  its models on CPU);
* its global ``cfg`` is set by its own ``assert_and_infer_cfg`` for each
  arch / hrnet_base / has_edge, with plain BatchNorm (``syncbn=False``); two
  fields its training path reads are added: ``LOSS.OCR_AUX_RMI`` (missing from
  the released config; only passed on to the criterion) and
  ``LOSS.SUPERVISED_MSCALE_WT = 1`` (so HMS passes its per-scale predictions to
  the criterion, where they are captured);
* two incompatibilities with current libraries are bridged: ``np.int`` (removed
  in NumPy 1.24) is aliased to ``int``, and ``F.interpolate`` ignores
  ``recompute_scale_factor`` when an explicit ``size`` is given (PyTorch >= 1.11
  rejects that combination; with a size it never had an effect).

For each configuration both models get the same weights
(``tests/synthetic_weights.py``: ``synthetic_state_dict``) and the same seeded input; the script
prints the maximum absolute difference of every output, in eval mode and in
train mode (the reference's train-mode tensors are captured from the arguments
it passes to its criterion).  ``--write-fixture`` saves a subsample of the
reference's eval outputs for ``tests/test_models_faithfulness.py``.

Exit status 1 if any compared output differs by more than ``--tol`` (1e-4).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
from typing import Dict, List

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEED = 20210402
FIXTURE_VERSION = 1

# name -> (arch, hrnet_base, has_edge, input shape, HMS eval scales or None)
CONFIGS = {
    "hrnet18_IF": ("ocrnet.AuxHRNet", 18, True, (2, 3, 67, 131), None),
    "hrnet18_IF_noedge": ("ocrnet.AuxHRNet", 18, False, (2, 3, 67, 131), None),
    "hr16s_4k_slim": ("lighthrnet.HRNet16", 16, True, (2, 3, 67, 131), None),
    "hr16s_4k_slim_noedge": ("lighthrnet.HRNet16", 16, False, (2, 3, 67, 131), None),
    "hrnet48_OCR_IF": ("ocrnet.HRNet", 48, True, (2, 3, 67, 131), None),
    "hrnet48_OCR_IF_noedge": ("ocrnet.HRNet", 48, False, (2, 3, 67, 131), None),
    "hrnet48_OCR_HMS_IF": ("ocrnet.HRNet_Mscale", 48, True, (2, 3, 75, 122), None),
    "hrnet48_OCR_HMS_IF_noedge": ("ocrnet.HRNet_Mscale", 48, False, (2, 3, 75, 122), None),
    # Combinations the reference can build but never released.
    "auxhrnet_w16": ("ocrnet.AuxHRNet", 16, True, (2, 3, 67, 131), None),
    "auxhrnet_w48": ("ocrnet.AuxHRNet", 48, True, (1, 3, 67, 131), None),
    "ocrnet_w16": ("ocrnet.HRNet", 16, True, (2, 3, 67, 131), None),
    "hms_w16": ("ocrnet.HRNet_Mscale", 16, True, (2, 3, 75, 122), None),
    # HMS with a scale above 1 that is not 2 and a non-default set.
    "hms_w48_scales_0.5_1_1.5": ("ocrnet.HRNet_Mscale", 48, True, (1, 3, 75, 122), (0.5, 1.0, 1.5)),
}
FIXTURE_CONFIGS = ["hrnet18_IF", "hr16s_4k_slim", "hrnet48_OCR_IF", "hrnet48_OCR_HMS_IF"]
QUICK_CONFIGS = ["hrnet18_IF", "hrnet18_IF_noedge", "hr16s_4k_slim", "auxhrnet_w16", "ocrnet_w16", "hms_w16"]

# Stand-ins for packages the reference imports at module level.
STUBS = {
    "apex/__init__.py": "from . import amp\n",
    "apex/amp.py": "def float_function(fn):\n    return fn\n",
    "runx/__init__.py": "",
    "runx/logx.py": (
        "class _Log:\n"
        "    def msg(self, *args, **kwargs):\n        pass\n"
        "    def initialize(self, *args, **kwargs):\n        pass\n"
        "logx = _Log()\n"),
    "torchvision/__init__.py": "",
    "torchvision/transforms.py": "",
    "torchvision/utils.py": "",
    "tabulate/__init__.py": "def tabulate(*args, **kwargs):\n    return ''\n",
}


def _load_testing_module():
    """tests/synthetic_weights.py by path (the tests folder is no package)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("_ours_testing", os.path.join(REPO, "tests", "synthetic_weights.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _RecordingCriterion:
    """Stands in for the reference's loss: records what it is given, returns 0."""

    def __init__(self):
        self.calls: List = []

    def __call__(self, outputs, targets, do_rmi=None):
        self.calls.append(outputs if isinstance(outputs, tuple) else (outputs,))
        return torch.zeros(())


def _train_outputs_from_calls(arch: str, has_edge: bool, calls) -> Dict[str, torch.Tensor]:
    """Name the reference's criterion arguments with our output keys."""
    if arch == "ocrnet.HRNet_Mscale":
        aux, main, lo, hi = calls  # aux loss first, then main, then the per-scale terms
        out = {"pred": main[0], "aux": aux[0], "pred_05x": lo[0], "pred_10x": hi[0]}
    else:
        main, aux = calls
        out = {"pred": main[0], "aux": aux[0]}
    if has_edge:
        # For HMS both edge tensors are sigmoid probabilities; for the others the
        # main edge is logits and the aux edge a probability.
        out["edge"] = main[1]
        out["edge_aux"] = aux[1]
    return out


def reference_worker(reference_dir: str, names: List[str], out_path: str) -> None:
    """Child process: build and run the reference models, save their outputs."""
    stub_dir = tempfile.mkdtemp(prefix="if_ref_stubs_")
    for rel, text in STUBS.items():
        path = os.path.join(stub_dir, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)
    sys.path[:0] = [reference_dir, stub_dir]
    if not hasattr(np, "int"):
        np.int = int
    import torch.nn.functional as F
    original_interpolate = F.interpolate

    def interpolate(input, size=None, scale_factor=None, mode="nearest", align_corners=None,
                    recompute_scale_factor=None, **kwargs):
        if size is not None:
            recompute_scale_factor = None
        return original_interpolate(input, size=size, scale_factor=scale_factor, mode=mode,
                                    align_corners=align_corners,
                                    recompute_scale_factor=recompute_scale_factor, **kwargs)

    F.interpolate = interpolate
    torch.nn.functional.interpolate = interpolate

    from utils.config import assert_and_infer_cfg, cfg  # the reference's
    from models import get_model                          # the reference's
    import models.ocrnet, models.lighthrnet  # noqa: F401  (registers their modules)
    testing = _load_testing_module()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    results = {}
    for name in names:
        arch, base, has_edge, shape, scales = CONFIGS[name]
        cfg.immutable(False)
        assert_and_infer_cfg("/tmp", 0, apex=False, syncbn=False, arch=arch, hrnet_base=base,
                             fp16=False, has_edge=has_edge, make_immutable=False)
        cfg.LOSS.SUPERVISED_MSCALE_WT = 1.0  # make HMS hand its per-scale predictions to the criterion
        cfg.LOSS.OCR_AUX_RMI = False  # read by the train path but missing from the released config
        if scales is not None:
            cfg.MODEL.N_SCALES = list(scales)
        criterion = _RecordingCriterion()
        net = get_model("models." + arch, num_classes=19, criterion=criterion, has_edge=has_edge)
        weights = testing.synthetic_state_dict(net.state_dict(), SEED)
        net.load_state_dict(weights, strict=True)
        images = testing.synthetic_images(shape, SEED)
        net.eval()
        with torch.no_grad():
            ev = net({"images": images})
        record = {"keys": {k: list(v.shape) for k, v in net.state_dict().items()},
                  "eval": {k: ev[k] for k in ("pred", "edge_pred") if k in ev}}
        net.train()
        torch.manual_seed(0)  # Dropout2d in the OCR block
        gts = torch.zeros(shape[0], shape[2], shape[3], dtype=torch.long)
        with torch.no_grad():
            net({"images": images, "gts": gts, "edge": torch.zeros(shape[0], 1, shape[2], shape[3])})
        record["train"] = _train_outputs_from_calls(arch, has_edge, criterion.calls)
        record["running_stats"] = {k: v for k, v in net.state_dict().items()
                                   if k.endswith(("running_mean", "running_var", "num_batches_tracked"))}
        results[name] = record
        print(f"reference: {name} done", flush=True)
    torch.save(results, out_path)


def run_ours(name: str):
    sys.path.insert(0, REPO)
    import models
    testing = _load_testing_module()
    synthetic_images, synthetic_state_dict = testing.synthetic_images, testing.synthetic_state_dict
    arch, base, has_edge, shape, scales = CONFIGS[name]
    options = {"scales": scales} if scales is not None else {}
    net = models.get_net(arch, num_classes=19, has_edge=has_edge, hrnet_base=base, **options)
    net.load_state_dict(synthetic_state_dict(net.state_dict(), SEED), strict=True)
    images = synthetic_images(shape, SEED)
    net.eval()
    with torch.no_grad():
        ev = net(images)
    net.train()
    torch.manual_seed(0)
    with torch.no_grad():
        tr = net(images)
    return net, ev, tr


def _grid(shape):
    """Rows/cols of the subsampling grid stored in the fixture (includes the last row/col)."""
    h, w = shape[-2:]
    rows = np.unique(np.r_[np.arange(0, h, 6), h - 1])
    cols = np.unique(np.r_[np.arange(0, w, 10), w - 1])
    return rows, cols


def fixture_entries(name: str, outputs: Dict[str, torch.Tensor]) -> Dict[str, np.ndarray]:
    entries = {}
    for key, t in outputs.items():
        a = t.detach().double().numpy()
        rows, cols = _grid(a.shape)
        entries[f"{name}__{key}__grid"] = a[:, :, rows][:, :, :, cols].astype(np.float32)
        entries[f"{name}__{key}__mean"] = a.mean(axis=(2, 3))
        entries[f"{name}__{key}__absmean"] = np.abs(a).mean(axis=(2, 3))
        entries[f"{name}__{key}__shape"] = np.array(a.shape)
    return entries


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--reference-dir", required=True,
                        help="clone of Qualcomm-AI-research/InverseForm")
    parser.add_argument("--configs", nargs="*", default=None,
                        help=f"subset of: {', '.join(CONFIGS)} (default: all)")
    parser.add_argument("--quick", action="store_true", help="only the small-trunk configurations")
    parser.add_argument("--tol", type=float, default=1e-4)
    parser.add_argument("--write-fixture", metavar="NPZ", default=None,
                        help="save the reference eval outputs of the four released archs here")
    parser.add_argument("--reference-worker", metavar="OUT", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    names = args.configs or (QUICK_CONFIGS if args.quick else list(CONFIGS))
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        parser.error(f"unknown configs {unknown}; valid: {', '.join(CONFIGS)}")
    if args.write_fixture:
        names = list(dict.fromkeys(names + FIXTURE_CONFIGS))
    ref_dir = os.path.abspath(args.reference_dir)
    if args.reference_worker:
        reference_worker(ref_dir, names, args.reference_worker)
        return 0
    if not os.path.isfile(os.path.join(ref_dir, "models", "ocrnet.py")):
        parser.error(f"{ref_dir} does not look like the InverseForm repository (no models/ocrnet.py)")

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "reference.pt")
        cmd = [sys.executable, os.path.abspath(__file__), "--reference-dir", ref_dir,
               "--reference-worker", out, "--configs", *names]
        subprocess.run(cmd, check=True, cwd=tmp)
        reference = torch.load(out, weights_only=True)

    failures = 0
    report = {}
    for name in names:
        ref = reference[name]
        net, ev, tr = run_ours(name)
        ours_keys = {k: list(v.shape) for k, v in net.state_dict().items()}
        keys_ok = ours_keys == ref["keys"]
        lines = [f"{name}: state_dict {'identical' if keys_ok else 'DIFFERENT'} "
                 f"({len(ours_keys)} keys)"]
        failures += not keys_ok
        diffs = {}
        for key, r in ref["eval"].items():
            diffs[f"eval.{key}"] = (ev[key] - r).abs().max().item()
        arch, _, has_edge, _, _ = CONFIGS[name]
        hms = arch == "ocrnet.HRNet_Mscale"
        for key, r in ref["train"].items():
            o = tr[key]
            # Edge tensors the reference passes through a sigmoid before resizing:
            # ours are the resized logits; compare sigmoid(ours) and report apart.
            if key == "edge_aux" or (hms and key == "edge"):
                diffs[f"train.{key} (sigmoid order)"] = (torch.sigmoid(o) - r).abs().max().item()
            else:
                diffs[f"train.{key}"] = (o - r).abs().max().item()
        # BatchNorm running statistics after the train-mode pass: the side effects
        # of training must match too (which layers ran, how often, on what).
        ours_state = net.state_dict()
        diffs["train.bn_running_stats"] = max(
            (ours_state[k].double() - v.double()).abs().max().item()
            for k, v in ref["running_stats"].items())
        for k, d in diffs.items():
            strict = "sigmoid order" not in k
            bad = strict and not d <= args.tol
            failures += bad
            lines.append(f"    {k:34s} max|diff| {d:.3e}{'  FAIL' if bad else ''}")
        scale = ref["eval"]["pred"].abs().max().item()
        lines.append(f"    (reference |pred| max {scale:.3g})")
        print("\n".join(lines), flush=True)
        report[name] = diffs

    for name in names:
        if name.endswith("_noedge") and name[:-len("_noedge")] in reference:
            same = torch.equal(reference[name]["eval"]["pred"],
                               reference[name[:-len("_noedge")]]["eval"]["pred"])
            print(f"reference pred of {name} {'==' if same else '!='} with edge head (bitwise)")

    if args.write_fixture:
        entries = {"seed": np.array(SEED), "version": np.array(FIXTURE_VERSION)}
        for name in FIXTURE_CONFIGS:
            entries.update(fixture_entries(name, reference[name]["eval"]))
            entries[f"{name}__input_shape"] = np.array(CONFIGS[name][3])
        path = os.path.abspath(args.write_fixture)
        tmp_path = path + ".tmp.npz"
        np.savez_compressed(tmp_path, **entries)
        os.replace(tmp_path, path)
        print(f"wrote {path} ({os.path.getsize(path) / 1024:.0f} KiB)")
    print(json.dumps({"failures": failures}))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
