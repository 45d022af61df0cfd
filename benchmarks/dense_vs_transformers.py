"""Dense training throughput: our Transformer vs transformers' LlamaForCausalLM, same shapes.

    python -m benchmarks dense_vs_transformers [--config configs/quickstart_dense.yaml] [--steps 5] [--warmup 3]

Both models are built from one config (the HF one through the exporter's `hf_config`, so every
shape, the RoPE base, the norm epsilon and the tied embeddings agree; the parameter counts are
printed side by side). Both train with the same optimizer (torch AdamW, fused), the same loss
(cross-entropy on the logits) on the same random tokens, each arm in a fresh process:

  ours eager | ours, per-block torch.compile (`train.compile=true`, what the trainer does) |
  transformers eager (sdpa attention) | transformers, torch.compile of the whole model

in fp32 and under bf16 autocast. tokens/s is the median step after warmup (compile time goes into
the warmup and is reported on its own). Writes dense_vs_transformers.{json,md} under --out.
It measures; it asserts nothing.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import torch

from benchmarks.harness import REPO, machine, md_table, parser, record, write_record

ARMS = [
    ("ours", "eager"),
    ("ours", "compile"),
    ("transformers", "eager"),
    ("transformers", "compile"),
]


def measure(config: str, impl: str, mode: str, dtype: str, steps: int, warmup: int) -> dict:
    """One arm, in this process."""
    from launch.config import load_config, validate
    from launch.convert.export import hf_config
    from launch.distributed.parallelize import apply_compile
    from launch.models.build import build_model
    from launch.train.validation import cross_entropy

    cfg = load_config([f"config={config}"])
    validate(cfg)
    torch.manual_seed(0)
    ours = build_model(cfg)
    ours.init_weights()
    if impl == "ours":
        model = ours
        forward = model
        if mode == "compile":
            apply_compile(model.layers)
    else:
        import transformers

        hf_cfg = hf_config(ours, cfg, None, torch.float32, bos=1, eos=2)
        hf_cfg._attn_implementation = "sdpa"
        model = transformers.LlamaForCausalLM(hf_cfg)
        del ours
        if mode == "compile":
            model = torch.compile(model)

        def forward(tokens):
            return model(input_ids=tokens, use_cache=False).logits

    params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1, fused=True)
    B, T = cfg.data.batch_size, cfg.data.seq_len
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16")
    gen = torch.Generator().manual_seed(0)
    times, losses = [], []
    for _ in range(warmup + steps):
        tokens = torch.randint(0, cfg.model.vocab_size, (B, T + 1), generator=gen)
        t0 = time.perf_counter()
        with autocast:
            loss = cross_entropy(forward(tokens[:, :-1]), tokens[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    timed = sorted(times[warmup:])
    step_s = timed[len(timed) // 2]
    return {
        "impl": impl,
        "mode": mode,
        "dtype": dtype,
        "params": params,
        "batch": B,
        "seq_len": T,
        "step_s": step_s,
        "tokens_per_s": B * T / step_s,
        "warmup_s": sum(times[:warmup]),
        "first_loss": losses[0],
    }


def run_arm(config: str, impl: str, mode: str, dtype: str, steps: int, warmup: int) -> dict:
    code = (
        "import json; from benchmarks.dense_vs_transformers import measure; "
        f"print(json.dumps(measure({config!r}, {impl!r}, {mode!r}, {dtype!r}, {steps}, {warmup})))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        return {
            "impl": impl,
            "mode": mode,
            "dtype": dtype,
            "error": proc.stderr.strip().splitlines()[-1][:200],
        }
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    ap = parser(__doc__)
    ap.add_argument("--config", default="configs/quickstart_dense.yaml")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps (compile happens here)")
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"])
    ap.add_argument("--modes", nargs="+", default=["eager", "compile"])
    args = ap.parse_args(argv)
    if args.quick:  # the tiny model, eager fp32 only, one timed step
        args.config, args.steps, args.warmup, args.dtypes, args.modes = (
            "configs/tiny.yaml",
            1,
            1,
            ["fp32"],
            ["eager"],
        )
    rows = []
    for dtype in args.dtypes:
        for impl, mode in ARMS:
            if mode not in args.modes:
                continue
            r = run_arm(args.config, impl, mode, dtype, args.steps, args.warmup)
            rows.append(r)
            print(json.dumps(r), flush=True)
    base = {
        r["dtype"]: r["tokens_per_s"]
        for r in rows
        if r["impl"] == "transformers" and r["mode"] == "eager" and "error" not in r
    }
    for r in rows:
        if "error" in r:
            r.update(
                params=0,
                batch=0,
                seq_len=0,
                step_s=float("nan"),
                tokens_per_s=float("nan"),
                warmup_s=float("nan"),
            )
        r["vs_hf_eager"] = r["tokens_per_s"] / base[r["dtype"]] if r["dtype"] in base else float("nan")
        r["params_m"] = r["params"] / 1e6
    m = machine()
    md = (
        f"# Dense training throughput: ours vs transformers' LlamaForCausalLM\n\n"
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch threads, torch {m['torch']}; "
        f"config `{args.config}`; median of {args.steps} optimizer steps after {args.warmup} warmup "
        f"(compile time is in the warmup); {time.strftime('%Y-%m-%d')}.\n\n"
        + md_table(
            rows,
            [
                ("model", "{impl}"),
                ("mode", "{mode}"),
                ("dtype", "{dtype}"),
                ("params", "{params_m:.2f}M"),
                ("batch × seq", "{batch} × {seq_len}"),
                ("step (s)", "{step_s:.3f}"),
                ("tokens/s", "{tokens_per_s:,.0f}"),
                ("vs transformers eager", "{vs_hf_eager:.2f}×"),
                ("warmup (s)", "{warmup_s:.1f}"),
            ],
        )
        + "\nSame optimizer (torch AdamW, fused), same loss and tokens; transformers uses its sdpa attention. "
        "bf16 = `torch.autocast(cpu, bfloat16)` over fp32 weights.\n\n"
        "Command: `python -m benchmarks dense_vs_transformers`\n"
    )
    write_record(record("dense_vs_transformers", args, rows, m, config=args.config), md, args.out)


if __name__ == "__main__":
    main()
