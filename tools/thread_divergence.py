"""Where runs with 1 and 2 CPU threads first differ: one training forward and backward of
HRNet-16-Slim on the same seeded batch, once per thread count, in two child processes.

    python tools/thread_divergence.py

Prints the first conv/BN output that differs (and by how much), whether the loss differs, and how
many parameter gradients differ and by how much (docs/main_job.md#why-the-figures-depend-on-the-machine).
Runs with the same thread count are compared too: they must be bit-identical.
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


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        runs = {}
        for label, threads in (("1 thread", 1), ("1 thread again", 1), ("2 threads", 2)):
            path = os.path.join(tmp, f"{label}.pt")
            env = dict(os.environ, OMP_NUM_THREADS=str(threads))
            subprocess.run([sys.executable, __file__, "--step", path], env=env, check=True)
            runs[label] = torch.load(path)
        compare(runs["1 thread"], runs["1 thread again"], "1 vs 1 thread")
        compare(runs["1 thread"], runs["2 threads"], "1 vs 2 threads")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--step":
        one_step(sys.argv[2])
    else:
        main()
