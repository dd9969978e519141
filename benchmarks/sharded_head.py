"""Benchmark: the head split over classes across devices (JAX).

Trains the `fit_step.py` MLP student (`Input(512) -> Dense(512, relu) ->
SampledDistillationHead(C)`) in `keras_dis.Distiller(None, student)` with
the default `DISLoss(k=10)`, Adam, batch 256, packed top-100 targets, under
`keras.distribution.ModelParallel` on a `(1, n)` ("batch", "model") mesh
whose layout map is `keras_dis.distribution.head_layout_map`: the head's
rows and their Adam state split `n` ways. Each configuration runs in its
own process with `n` devices; on a machine without `n` accelerators they
are simulated CPU devices (`XLA_FLAGS=
--xla_force_host_platform_device_count=n`), which share the host's cores:
their step times show what splitting costs, not what it gains.

For every `C` in `--classes` and `n` in `--shards`, one table row:

- `head MiB/device`: the head's kernel, bias and row-sparse state held by
  one device (read from the arrays' shards);
- `step MiB/device`: the compiled step's memory on one device (XLA's
  memory analysis: arguments + temporaries + outputs not aliased);
- `ms/step`: a `fit()` step, median of `--repeats` epochs of `--steps`
  steps after a warm-up epoch;
- the collectives of the compiled step: how many, their bytes per device
  in all, and the largest.

A configuration whose predicted step memory per device exceeds
`--device-memory-gib` is not run (row marked `over budget`). The second
table is the largest `C` whose step fits that budget per device, for each
`n` and each budget in `--budgets-gib`, from the step memory measured at two
small `C` (it is linear in `C`).

    KERAS_BACKEND=jax python benchmarks/sharded_head.py
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time

FIELDS = (
    "machine", "num_classes", "shards", "features_dim", "batch_size", "k",
    "head_mib_per_device", "step_mib_per_device", "ms_per_step",
    "collectives", "collective_kib", "largest_collective_kib",
    "class_sized_collectives", "status",
)
CAPACITY_FIELDS = (
    "machine", "shards", "budget_gib", "mib_per_class_per_million",
    "fixed_mib", "largest_classes",
)
MIB = 2**20


def run_child(config):
    """Measures one configuration (in a process with `shards` devices)."""
    import keras
    import numpy as np

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import keras_dis
    from fit_step import build_model
    from fit_step import make_data

    shards, num_classes = config["shards"], config["num_classes"]
    batch_size, steps = config["batch_size"], config["steps"]
    devices = keras.distribution.list_devices()[:shards]
    mesh = keras.distribution.DeviceMesh((1, shards), ("batch", "model"), devices)
    distribution = keras.distribution.ModelParallel(
        layout_map=keras_dis.distribution.head_layout_map(mesh),
        batch_dim_name="batch",
    )
    num_examples = batch_size * (steps if config["train"] else 1)
    x, _, targets = make_data("mlp", num_examples, num_classes, min(100, num_classes))
    with distribution.scope():
        keras.utils.set_random_seed(0)
        model, _ = build_model("default", "mlp", num_classes, config["k"], "auto")
        compiled = keras_dis.distribution.compiled_train_step(
            model, x[:batch_size], targets[:batch_size]
        )
        memory = compiled.memory_analysis()
        step_bytes = (
            memory.argument_size_in_bytes + memory.temp_size_in_bytes
            + memory.output_size_in_bytes - memory.alias_size_in_bytes
        )
        collectives = keras_dis.distribution.step_collectives(compiled)
        if shards == 1:
            # XLA keeps the step's sums over a one-device axis as
            # all-reduces that move nothing.
            collectives = []
        head = model.student.layers[-1]
        head_bytes = sum(
            weight.value.addressable_shards[0].data.nbytes
            for weight in head.weights
        )
        result = {
            "head_mib_per_device": head_bytes / MIB,
            "step_mib_per_device": step_bytes / MIB,
            "collectives": len(collectives),
            "collective_kib": sum(size for _, _, size in collectives) / 1024,
            "largest_collective_kib": max(
                [size for _, _, size in collectives] or [0]
            ) / 1024,
            "class_sized_collectives": sum(
                any(dim >= num_classes // shards for s in shapes for dim in s)
                for _, shapes, _ in collectives
            ),
        }
        if config["train"]:
            fit = dict(batch_size=batch_size, epochs=1, verbose=0, shuffle=False)
            model.fit(x, targets, **fit)  # warm-up: compiles
            seconds = []
            for _ in range(config["repeats"]):
                start = time.perf_counter()
                model.fit(x, targets, **fit)
                seconds.append(time.perf_counter() - start)
            result["ms_per_step"] = 1000 * float(np.median(seconds)) / steps
    return result


def measure(config):
    """Runs `run_child(config)` in a process with `config["shards"]` devices."""
    env = dict(os.environ, KERAS_BACKEND="jax")
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "")
        + f" --xla_force_host_platform_device_count={config['shards']}"
    )
    result = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--child", json.dumps(config)],
        capture_output=True, text=True, env=env,
    )
    if result.returncode != 0:
        raise RuntimeError(f"{config}: {result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def step_memory_line(args, shards):
    """(MiB per class, fixed MiB) of the step memory per device, from two
    compiled steps at small class counts."""
    small = [2**13 * shards, 2**14 * shards]
    mib = [
        measure(dict(shards=shards, num_classes=c, batch_size=args.batch_size,
                     k=args.k, steps=1, repeats=0, train=False))
        ["step_mib_per_device"]
        for c in small
    ]
    per_class = (mib[1] - mib[0]) / (small[1] - small[0])
    return per_class, mib[0] - per_class * small[0]


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        print(json.dumps(run_child(json.loads(args.child))))
        return
    machine = f"{platform.machine()} cpu, simulated devices"
    budget_mib = args.device_memory_gib * 1024
    lines = {n: step_memory_line(args, n) for n in args.shards}
    rows = []
    for num_classes in args.classes:
        for shards in args.shards:
            per_class, fixed = lines[shards]
            row = dict(machine=machine, num_classes=num_classes, shards=shards,
                       features_dim=512, batch_size=args.batch_size, k=args.k)
            predicted = fixed + per_class * num_classes
            if num_classes % shards:
                row["status"] = "classes not divisible"
            elif predicted > budget_mib:
                row["status"] = f"over budget ({predicted / 1024:.1f} GiB)"
            else:
                row.update(measure(dict(
                    shards=shards, num_classes=num_classes,
                    batch_size=args.batch_size, k=args.k, steps=args.steps,
                    repeats=args.repeats, train=True,
                )))
                row["status"] = "trained"
            rows.append(row)
            print(row, flush=True)
    capacity = []
    for shards in args.shards:
        per_class, fixed = lines[shards]
        for budget in args.budgets_gib:
            largest = int((budget * 1024 - fixed) / per_class) // shards * shards
            capacity.append(dict(
                machine=machine, shards=shards, budget_gib=budget,
                mib_per_class_per_million=per_class * 1e6, fixed_mib=fixed,
                largest_classes=max(largest, 0),
            ))
    print_tables(rows, capacity, args)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from fit_step import write_rows

    write_rows(rows, FIELDS, args.output, "sharded_head_jax_cpu.csv")
    capacity_output = None
    if args.output:
        root, extension = os.path.splitext(args.output)
        capacity_output = f"{root}_capacity{extension}"
    write_rows(capacity, CAPACITY_FIELDS, capacity_output,
               "sharded_head_capacity_jax_cpu.csv")


def _number(value, digits=1):
    return "" if value in (None, "") else f"{float(value):,.{digits}f}"


def print_tables(rows, capacity, args):
    print(f"\nDIS k={args.k}, MLP d=512, B={args.batch_size}, Adam; "
          f"budget {args.device_memory_gib} GiB per device\n")
    print("| C | shards | head MiB/device | step MiB/device | ms/step | "
          "collectives | KiB/step | largest KiB | class-sized | status |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['num_classes']:,} | {row['shards']} | "
            f"{_number(row.get('head_mib_per_device'))} | "
            f"{_number(row.get('step_mib_per_device'))} | "
            f"{_number(row.get('ms_per_step'))} | {row.get('collectives', '')} | "
            f"{_number(row.get('collective_kib'))} | "
            f"{_number(row.get('largest_collective_kib'))} | "
            f"{row.get('class_sized_collectives', '')} | {row['status']} |"
        )
    budgets = sorted({row["budget_gib"] for row in capacity})
    print("\nLargest C whose step fits per device\n")
    print("| shards | MiB per 10^6 classes | "
          + " | ".join(f"{b:g} GiB/device" for b in budgets) + " |")
    print("|---|---|" + "---|" * len(budgets))
    for shards in sorted({row["shards"] for row in capacity}):
        mine = [row for row in capacity if row["shards"] == shards]
        print(f"| {shards} | {_number(mine[0]['mib_per_class_per_million'], 0)} | "
              + " | ".join(f"{row['largest_classes']:,}" for row in mine) + " |")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--classes", type=int, nargs="+", default=[2**17, 2**20])
    parser.add_argument("--shards", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--steps", type=int, default=10,
                        help="fit() steps per timed epoch")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device-memory-gib", type=float, default=3.0,
                        help="memory per device: configurations predicted "
                             "to need more are not run (default: 24 GiB / 8)")
    parser.add_argument("--budgets-gib", type=float, nargs="+",
                        default=[3.0, 16.0, 80.0])
    parser.add_argument("--output", default=None,
                        help="CSV path (the capacity table goes beside it)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


if __name__ == "__main__":
    main()
