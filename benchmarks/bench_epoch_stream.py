"""The wait at each epoch's start: one loader iterator per epoch against one spanning the epochs.

    python benchmarks/bench_epoch_stream.py [--epochs 6 --step_ms 150 --workers 2]

The main job's training loader (configs/synthetic.yaml's data section: the synthetic Cityscapes,
8 crops of 128 x 256 per batch, class-uniform sampling) is read for ``--epochs`` epochs while the
main process sleeps ``--step_ms`` per batch, as the host does while a GPU computes a step (on a
CPU-only machine the step itself occupies the cores the workers need; there the comparison
measures nothing useful).  Two ways, alternating twice so that changes of the machine's speed
touch both: a new iterator per epoch, and ``experiment.schedule.batch_stream``'s one iterator
across all epochs (``EpochIndexSampler.span``).  Prints the wall time of each and the mean wait
for a batch at an epoch's first step and at the others.  Both read the same batches (checked).
"""
import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiment.run_config import load_run_config  # noqa: E402
from experiment.data import dataset_root, train_dataset, train_loader  # noqa: E402
from experiment.schedule import batch_stream, iterations_per_epoch  # noqa: E402


def per_epoch_iterators(loader, epochs):
    for epoch in range(epochs):
        loader.sampler.set_epoch(epoch)
        for batch in loader:
            yield epoch, batch


def spanning(loader, epochs):
    for epoch, _, batch in batch_stream(loader, 0, epochs * iterations_per_epoch(loader)):
        yield epoch, batch


def timed(stream, step_s):
    """Wall time, waits at epoch starts, other waits, and each batch's names."""
    first, other, names, last_epoch = [], [], [], None
    start = time.perf_counter()
    t = start
    for epoch, batch in stream:
        waited = time.perf_counter() - t
        (first if epoch != last_epoch else other).append(waited)
        last_epoch = epoch
        names.append(tuple(batch["name"]))
        time.sleep(step_s)
        t = time.perf_counter()
    return time.perf_counter() - start, first, other, names


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                         "configs", "synthetic.yaml"))
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--step_ms", type=float, default=150.0, help="simulated device step per batch")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    cfg = load_run_config([args.config], cuda=False)
    d = cfg.data
    root, _ = dataset_root(d)
    results = {}
    for way in ("per epoch", "spanning", "per epoch", "spanning"):
        loader = train_loader(train_dataset(d, root, seed=0), cfg.train.batch_size, args.workers, seed=0)
        stream = per_epoch_iterators if way == "per epoch" else spanning
        results.setdefault(way, []).append(timed(stream(loader, args.epochs), args.step_ms / 1e3))
    assert all(r[3] == results["per epoch"][0][3] for runs in results.values() for r in runs), "batches differ"
    print(f"{args.epochs} epochs of {len(results['spanning'][0][3]) // args.epochs} batches of "
          f"{cfg.train.batch_size} crops, {args.workers} workers, {args.step_ms:.0f} ms simulated step, "
          f"{os.cpu_count()} CPUs; two runs each:")
    for way, runs in results.items():
        walls = ", ".join(f"{r[0]:.2f}" for r in runs)
        first = statistics.mean(w for r in runs for w in r[1][1:])   # the very first epoch starts the workers
        other = statistics.mean(w for r in runs for w in r[2])
        print(f"  {way:9s}: wall {walls} s; mean wait for a batch at an epoch's start {first * 1e3:.0f} ms "
              f"(after the first), at other steps {other * 1e3:.0f} ms")


if __name__ == "__main__":
    main()
