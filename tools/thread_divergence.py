"""Where runs with 1 and 2 CPU threads, or with another CPU's kernels, first differ: one training
forward and backward of HRNet-16-Slim on the same seeded batch, once per setting, each in its own
child process.

    python tools/thread_divergence.py

Prints the first conv/BN output that differs (and by how much), whether the loss differs, and how
many parameter gradients differ and by how much (docs/main_job.md#why-the-figures-depend-on-the-machine).
Runs with the same setting are compared too: they must be bit-identical.

The kernel settings stand in for a CPU without AVX-512 (an AMD EPYC of the Zen 2/3 kind): each
library's variable caps the instruction set it dispatches to, one library at a time and all three
together. On a CPU without AVX-512 they should change nothing, and the tool shows whether they do.
"""
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402


def one_step(out_path: str) -> None:
    from models import get_net

    torch.manual_seed(0)
    net = get_net("lighthrnet.HRNet16", num_classes=19, has_edge=True).train()
    outputs = {}

    def keep(name):
        def hook(module, inputs, output):  # returns None: the output itself is left alone
            outputs.setdefault(name, output.detach().clone())
        return hook

    for name, module in net.named_modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.BatchNorm2d)):
            module.register_forward_hook(keep(name))
    images = torch.randn(8, 3, 128, 256, generator=torch.Generator().manual_seed(1))
    loss = net(images)["pred"].logsumexp(1).mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
    torch.save({"outputs": outputs, "grads": grads, "loss": loss.detach()}, out_path)


def compare(a: dict, b: dict, label: str) -> None:
    names = list(a["outputs"])
    differing = [n for n in names if not torch.equal(a["outputs"][n], b["outputs"][n])]
    print(f"{label}: {len(names) - len(differing)} of {len(names)} conv/BN outputs identical", end="")
    if differing:
        first = differing[0]
        diff = (a["outputs"][first] - b["outputs"][first]).abs().max().item()
        print(f"; the first that differs is {first} (module {names.index(first) + 1}), by {diff:.2e} "
              f"of {a['outputs'][first].abs().max().item():.2e}")
    else:
        print()
    print(f"  loss {a['loss'].item():.9f} vs {b['loss'].item():.9f} ({'equal' if torch.equal(a['loss'], b['loss']) else 'different'})")
    rel = [((a["grads"][k] - b["grads"][k]).abs().max() / a["grads"][k].abs().max().clamp_min(1e-30)).item()
           for k in a["grads"]]
    changed = sorted(r for r in rel if r > 0)
    print(f"  parameter gradients: {len(changed)} of {len(rel)} differ" + (
        f"; relative difference median {changed[len(changed) // 2]:.1e}, max {changed[-1]:.1e}" if changed else ""))


# Each variable must be set before its library loads, hence one child process per setting.
AVX2_KERNELS = {
    "oneDNN (convolutions, BatchNorm)": {"ONEDNN_MAX_CPU_ISA": "AVX2"},
    "MKL (matrix products)": {"MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "ATen (elementwise, reductions)": {"ATEN_CPU_CAPABILITY": "avx2"},
}
AVX2_KERNELS["all three"] = {k: v for env in AVX2_KERNELS.values() for k, v in env.items()}


def run_step(tmp: str, threads: int, extra_env: dict) -> dict:
    path = os.path.join(tmp, f"{len(os.listdir(tmp))}.pt")
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), **extra_env)
    subprocess.run([sys.executable, __file__, "--step", path], env=env, check=True)
    return torch.load(path)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        one = run_step(tmp, 1, {})
        compare(one, run_step(tmp, 1, {}), "1 vs 1 thread")
        compare(one, run_step(tmp, 2, {}), "1 vs 2 threads")
        for name, env in AVX2_KERNELS.items():
            compare(one, run_step(tmp, 1, env), f"1 thread vs 1 thread with AVX2 kernels in {name}")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--step":
        one_step(sys.argv[2])
    else:
        main()
