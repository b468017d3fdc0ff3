"""Local-training throughput: the sequential per-client loop vs the batched engine, one process, one run.

    python bench/throughput.py --model tiny-vit --clients 12 --batch-per-client 10 --image-size 28 --steps 5
    python bench/throughput.py --model dinov2-s --clients 12 --batch-per-client 10 --image-size 56 --steps 2
    python bench/throughput.py --model dinov2-s --clients 6 --batch-per-client 32 --image-size 56 --steps 3 \
        --lora-layers last:2

Random weights of the model's shape (configs are built, nothing is downloaded), random images, one
`deer` phase-B local epoch of `--steps` mini-batches per client. Sequential runs in fp32; batched
runs under bf16 autocast (on CPU, where bf16 can be slow, both fp32 and bf16 are measured and the
faster is reported as `batched_img_s`, named by `batched_precision`). The last line printed is one
JSON object: sequential_img_s, batched_img_s, ratio (batched / sequential), mfu, device.
`--baseline FILE` also times the `BatchedEngine` of another copy of `batched.py` (e.g. the one before
a change) in the same process, under the same precision: `baseline_img_s`. On a GPU,
`staged_img_s` is the batched engine with the data staged on the device (`stage_on_device=True`)
instead of each step's batch gathered on the host and copied over (the default).

MFU (GPU only, else null) = batched img/s × 2 × forward FLOPs per image ÷ the device's bf16 matmul
rate, measured here with an 8192³ bf16 matmul. Factor 2: the backbone is frozen, so a training step
costs a forward and a backward to the activations (about one forward more); the adapter's weight
gradients are negligible. Forward FLOPs come from `torch.utils.flop_counter` on one image.

`--lora-layers last:K` puts LoRA in the last K blocks only and also times the frozen-prefix cache:
`prefix_build_img_s` (the one-off forward of the frozen blocks, per image) and `cached_img_s` (the
sequential engine training on the cached block outputs); `cached_ratio` = cached / sequential.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import sys
import time

import torch
from peft import get_peft_model
from torch.utils.data import TensorDataset
from torch.utils.flop_counter import FlopCounterMode
from transformers import Dinov2ForImageClassification, ViTConfig, ViTForImageClassification

from peft_deer import DeerLoraConfig
from peft_deer.backbones.load import default_head_modules, default_target_modules, dinov2_s_config, load_backbone
from peft_deer.backbones.prefix_cache import (
    blocks_pattern,
    compute_prefix_features,
    num_blocks,
    parse_lora_layers,
    skip_prefix,
)
from peft_deer.federated import (
    BatchedEngine,
    ClientTask,
    LocalTraining,
    SequentialEngine,
    adapter_layout,
    get_adapter_state,
    iter_phases,
)

NUM_LABELS = 2


def build_model(name: str, image_size: int) -> tuple[torch.nn.Module, int]:
    """(random-weight classifier of `name`'s shape, input channels)."""
    if name == "tiny-vit":
        return load_backbone("tiny-vit", NUM_LABELS, image_size=image_size).model, 1
    if name == "vit-b16":
        return ViTForImageClassification(ViTConfig(image_size=image_size, num_labels=NUM_LABELS)), 3
    if name == "dinov2-s":
        config = dinov2_s_config()
        config.num_labels = NUM_LABELS
        return Dinov2ForImageClassification(config), 3
    raise ValueError(f"--model {name!r}")


def forward_flops_per_image(model: torch.nn.Module, channels: int, image_size: int, device: torch.device) -> float:
    x = torch.randn(1, channels, image_size, image_size, device=device)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(pixel_values=x)
    return float(counter.get_total_flops())


def bf16_matmul_flops_per_s(device: torch.device, n: int = 8192, repeats: int = 20) -> float:
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    torch.cuda.synchronize(device)
    return 2 * n**3 * repeats / (time.perf_counter() - start)


def images_per_s(engine, model, layout, state, phase, tasks, device) -> float:
    # warm-up; on a GPU the batched engine warms up on all clients, so that allocator growth and kernel
    # selection for the full stacked batch stay out of the timed run (2 clients give smaller shapes)
    full = device.type == "cuda" and isinstance(engine, BatchedEngine)
    engine.train_clients(model, layout, state, phase, tasks if full else tasks[: min(2, len(tasks))])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    updates = engine.train_clients(model, layout, state, phase, tasks)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    return sum(u.images_seen for u in updates) / seconds


def load_batched_engine(path: str) -> type:
    """`BatchedEngine` from another copy of peft_deer/federated/batched.py (its relative imports resolve there)."""
    spec = importlib.util.spec_from_file_location("peft_deer.federated._baseline_batched", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module.BatchedEngine


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--model", choices=["tiny-vit", "dinov2-s", "vit-b16"], default="tiny-vit")
    p.add_argument("--clients", type=int, default=12)
    p.add_argument("--batch-per-client", type=int, default=10)
    p.add_argument("--image-size", type=int, default=None, help="px (default: 28 tiny-vit, 224 otherwise)")
    p.add_argument("--steps", type=int, default=5, help="mini-batches per client (one local epoch)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--baseline", default=None, help="another batched.py to time as well (baseline_img_s)")
    p.add_argument("--lora-layers", default="all", help="'all' or 'last:K'; last:K also times the prefix cache")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    size = args.image_size or (28 if args.model == "tiny-vit" else 224)

    torch.manual_seed(0)
    backbone, channels = build_model(args.model, size)
    blocks = parse_lora_layers(args.lora_layers, num_blocks(backbone))
    config = DeerLoraConfig(
        layers_to_transform=blocks,
        layers_pattern=None if blocks is None else blocks_pattern(backbone),
        r=args.rank,
        lora_alpha=args.rank,
        target_modules=default_target_modules(backbone),
        modules_to_save=default_head_modules(backbone),
        method="deer",
    )
    model = get_peft_model(backbone, config).to(device)
    layout = adapter_layout(model)
    state = get_adapter_state(model, layout)
    phase = next(iter_phases("deer", 1))
    n = args.steps * args.batch_per_client
    g = torch.Generator().manual_seed(0)
    tasks = [
        ClientTask(
            c,
            TensorDataset(
                torch.randn(n, channels, size, size, generator=g), torch.randint(0, NUM_LABELS, (n,), generator=g)
            ),
            c,
        )
        for c in range(args.clients)
    ]

    def training(precision: str) -> LocalTraining:
        return LocalTraining(local_epochs=1, batch_size=args.batch_per_client, lr=1e-3, mixed_precision=precision)

    sequential = images_per_s(SequentialEngine(training("no")), model, layout, state, phase, tasks, device)
    print(f"sequential fp32: {sequential:.1f} img/s", flush=True)
    batched_by_precision = {}
    for precision in ("bf16",) if device.type == "cuda" else ("no", "bf16"):
        rate = images_per_s(BatchedEngine(training(precision)), model, layout, state, phase, tasks, device)
        batched_by_precision["fp32" if precision == "no" else "bf16"] = rate
        print(f"batched {precision}: {rate:.1f} img/s", flush=True)
    best = max(batched_by_precision, key=batched_by_precision.get)
    batched = batched_by_precision[best]
    staged = None
    if device.type == "cuda":
        engine = BatchedEngine(training("bf16"), stage_on_device=True)
        staged = images_per_s(engine, model, layout, state, phase, tasks, device)
        print(f"batched bf16, staged on the device: {staged:.1f} img/s", flush=True)
    baseline = None
    if args.baseline:
        engine = load_batched_engine(args.baseline)(training("no" if best == "fp32" else "bf16"))
        baseline = images_per_s(engine, model, layout, state, phase, tasks, device)
        print(f"baseline batched {best}: {baseline:.1f} img/s", flush=True)

    prefix_build, cached = None, None
    if blocks is not None and blocks[0] > 0:
        start = time.perf_counter()
        cached_tasks = [
            ClientTask(t.client_id, compute_prefix_features(model, t.dataset, blocks[0], 64, torch.float16), t.seed)
            for t in tasks
        ]
        prefix_build = n * len(tasks) / (time.perf_counter() - start)
        with skip_prefix(model, blocks[0]):
            cached = images_per_s(SequentialEngine(training("no")), model, layout, state, phase, cached_tasks, device)
        print(f"prefix cache: built at {prefix_build:.1f} img/s, training on it {cached:.1f} img/s", flush=True)

    flops = forward_flops_per_image(model, channels, size, device)
    mfu, peak = None, None
    if device.type == "cuda":
        peak = bf16_matmul_flops_per_s(device)
        mfu = batched * 2 * flops / peak
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    )
    result = {
        "model": args.model,
        "clients": args.clients,
        "batch_per_client": args.batch_per_client,
        "image_size": size,
        "steps": args.steps,
        "sequential_img_s": round(sequential, 2),
        "batched_img_s": round(batched, 2),
        "batched_precision": best,
        "batched_img_s_by_precision": {k: round(v, 2) for k, v in batched_by_precision.items()},
        "ratio": round(batched / sequential, 3),
        "lora_layers": args.lora_layers,
        "prefix_build_img_s": None if prefix_build is None else round(prefix_build, 2),
        "cached_img_s": None if cached is None else round(cached, 2),
        "cached_ratio": None if cached is None else round(cached / sequential, 3),
        "staged_img_s": None if staged is None else round(staged, 2),
        "baseline_img_s": None if baseline is None else round(baseline, 2),
        "forward_gflops_per_image": float(f"{flops / 1e9:.4g}"),
        "bf16_matmul_tflops": None if peak is None else round(peak / 1e12, 1),
        "mfu": None if mfu is None else round(mfu, 4),
        "device": name,
    }
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
