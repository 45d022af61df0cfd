"""`python -m benchmarks`: one entry for every benchmark module, one record format, results by machine."""

from __future__ import annotations

import json
import subprocess
import sys

from benchmarks import HERE, NOT_BENCHMARKS, names
from benchmarks.harness import machine_slug, record, write_record
from tests.benchmarks.checks import result_record
from tests.conftest import REPO


def entry(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "benchmarks", *args], capture_output=True, text=True, timeout=120,
                          cwd=REPO)  # fmt: skip


def test_list_names_every_benchmark_module_with_what_it_measures():
    proc = entry("list")
    assert proc.returncode == 0, proc.stderr
    listed = {line.split()[0]: line.split(None, 1)[1] for line in proc.stdout.splitlines()}
    modules = {p.stem for p in HERE.glob("*.py")} - NOT_BENCHMARKS
    assert set(listed) == modules == set(names()) and len(modules) >= 10
    assert all(len(what) > 20 for what in listed.values())  # a sentence, not an empty column


def test_an_unknown_name_is_a_one_line_error_with_exit_2():
    proc = entry("no_such_benchmark")
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert (
        len(lines) == 1
        and "unknown benchmark 'no_such_benchmark'" in lines[0]
        and "memory_lookup" in lines[0]
    )


def test_every_benchmark_takes_quick_and_out():
    for name in names():
        proc = entry(name, "--help")
        assert proc.returncode == 0, (name, proc.stderr[-1500:])
        assert "--quick" in proc.stdout and "--out" in proc.stdout, name


def test_no_benchmark_or_test_edits_sys_path():
    for path in [
        *HERE.glob("*.py"),
        *(REPO / "experiments").glob("*.py"),
        *(REPO / "tests" / "benchmarks").glob("*.py"),
    ]:
        if path.name != "test_entry.py":  # this test names what it looks for
            assert "sys.path." not in path.read_text(), path


def test_machine_slugs_of_recorded_machines():
    assert machine_slug({"cpu": "Intel(R) Xeon(R) Processor", "isa": ["AVX-512", "AMX"]}) == "xeon_avx512_amx"
    assert machine_slug({"cpu_model": "AMD EPYC (family 25 model 1, AVX2)"}) == "epyc_zen3_avx2"
    assert machine_slug({"cpu": "AMD EPYC 9654 (family 25 model 17, AVX-512)"}) == "epyc_zen4_avx512"
    assert machine_slug({"cpu": "AMD EPYC"}) == "epyc"  # older records: the generation is unknown


def test_results_are_filed_under_the_machine_they_record():
    results = REPO / "benchmarks" / "results"
    for path in results.rglob("*.json"):
        rec = json.loads(path.read_text())
        folder = path.relative_to(results).parts[0]
        expected = (
            machine_slug(rec["machine"]) if isinstance(rec, dict) and "machine" in rec else "unrecorded"
        )
        assert folder == expected, path


def test_one_record_written_as_json_and_markdown(tmp_path):
    rec = record("demo", {"quick": True, "out": tmp_path}, [{"ms": 0.01}], extra_table=[1])
    path = write_record(rec, "# demo\n", tmp_path)
    back = result_record(json.loads(path.read_text()), "demo")
    assert back["args"] == {"quick": True, "out": str(tmp_path)} and back["extra_table"] == [1]
    assert (tmp_path / "demo.md").read_text() == "# demo\n"
