"""torch.compile of a grown stack (whole model, and per block like torchtitan) matches eager."""

from __future__ import annotations

import scalenet_test_toys as toys
import torch

from scalenet import adapters, grow


def test_compiled_grown_model_matches_eager_forward_and_backward():
    torch._dynamo.reset()
    layers, pool = toys.make_layers(2, memory_at=(1,))
    model = toys.Model(grow(layers, adapter_rank=2), pool=pool)
    with torch.no_grad():
        for _, m in adapters(model.layers):
            m.lora_B.normal_(0, 0.1)
    x, rope = torch.randn(2, 5, 16), torch.rand(16) + 0.5

    eager = model(x, rope)
    eager.pow(2).mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    out = compiled(x, rope)
    torch.testing.assert_close(out, eager)
    out.pow(2).mean().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], msg=n)
    # ties intact after compiling
    assert model.layers[0].attention.wq.weight is model.layers[2].attention.wq.weight


def test_per_block_compile_matches_eager():
    torch._dynamo.reset()
    layers, _ = toys.make_layers(2)
    grown = grow(layers, adapter_rank=2)
    x, rope = torch.randn(2, 5, 16), torch.rand(16) + 0.5
    want = toys.run_stack(grown, x, rope)
    for block in grown:
        block.compile(backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(toys.run_stack(grown, x, rope), want)
