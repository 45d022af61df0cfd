"""2-rank gloo FSDP2 check of a grown model, run as a script by test_fsdp.py (spawn needs an importable
__main__, which a pytest-imported test module is not).

For each sharding layout (root-only, and scalenet.fsdp_units groups + root) each rank runs its half of
the batch; the loss, the shared weights' gradients and the weights after one SGD step must equal the
single-process run on the full batch, and the ties must still be the same parameter objects.
Usage: python fsdp_worker.py OUT.json
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

_spec = importlib.util.spec_from_file_location("scalenet_test_toys", Path(__file__).with_name("toys.py"))
toys = importlib.util.module_from_spec(_spec)
sys.modules["scalenet_test_toys"] = toys
_spec.loader.exec_module(toys)

import scalenet  # noqa: E402

CHECKED = ["layers.0.attention.wq.weight", "layers.1.feed_forward.keys", "layers.2.ffn_norm.weight",
           "layers.3.attention.wq.lora_B", "pool.values"]  # fmt: skip


def build() -> torch.nn.Module:
    layers, pool = toys.make_layers(3, memory_at=(1,))
    model = toys.Model(scalenet.grow(layers, adapter_rank=2), pool=pool).double()
    with torch.no_grad():
        for _, m in scalenet.adapters(model.layers):
            m.lora_B.normal_(0, 0.1, generator=torch.Generator().manual_seed(0))
    return model


def batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(4, 5, 16, generator=g, dtype=torch.float64), torch.rand(
        16, generator=g, dtype=torch.float64
    ) + 0.5


def reference() -> dict:
    model = build()
    x, rope = batch()
    loss = model(x, rope).pow(2).mean()
    loss.backward()
    params = dict(model.named_parameters(remove_duplicate=False))
    grads = {n: params[n].grad.clone() for n in CHECKED}
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    return {"loss": loss.item(), "grads": grads, "after": {n: params[n].detach().clone() for n in CHECKED}}


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def worker(rank: int, port: int, ref: dict, out: str) -> None:
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    report = {}
    try:
        for layout in ("root", "units"):
            model = build()
            if layout == "units":
                for unit in scalenet.fsdp_units(model.layers):
                    fully_shard(unit if len(unit) > 1 else unit[0])
            fully_shard(model)
            x, rope = batch()
            loss = model(x.chunk(2)[rank], rope).pow(2).mean()
            loss.backward()
            mean_loss = loss.detach().clone()
            dist.all_reduce(mean_loss)
            params = dict(model.named_parameters(remove_duplicate=False))
            res = {"loss_err": abs(mean_loss.item() / 2 - ref["loss"])}
            res["grad_err"] = max(
                (full(params[n].grad) - ref["grads"][n]).abs().max().item() for n in CHECKED
            )
            torch.optim.SGD(model.parameters(), lr=0.1).step()
            res["step_err"] = max((full(params[n]) - ref["after"][n]).abs().max().item() for n in CHECKED)
            res["tied"] = (
                all(
                    params[f"layers.{i}.{n}"] is params[f"layers.{i + 3}.{n}"]
                    for i in range(3)
                    for n in ("attention.wq.weight", "ffn_norm.weight")
                )
                and params["layers.0.attention.wq.lora_A"] is not params["layers.3.attention.wq.lora_A"]
            )
            report[layout] = res
    finally:
        dist.destroy_process_group()
    if rank == 0:
        Path(out).write_text(json.dumps(report))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    torch.set_num_threads(1)
    mp.spawn(worker, args=(free_port(), reference(), sys.argv[1]), nprocs=2)
