"""The command line: help on stdout, one-line errors on stderr (exit 2), what bench runs and writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import pytest

from iplr_jax import bench
from iplr_jax.__main__ import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _error_line(capsys) -> str:
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("argv", [[], ["--help"], ["-h"]])
def test_usage_on_stdout(argv, capsys):
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert "iplr-jax {demo,bench}" in out and "python -m iplr_jax {demo,bench}" in out


@pytest.mark.parametrize("command", ["demo", "bench"])
def test_command_help_on_stdout(command, capsys):
    assert main([command, "--help"]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert out.startswith(f"usage: iplr-jax {command}")


def test_unknown_command(capsys):
    assert main(["foo"]) == 2
    line = _error_line(capsys)
    assert "unknown command 'foo'" in line and "demo, bench" in line


def test_unknown_command_through_python_m():
    r = subprocess.run([sys.executable, "-m", "iplr_jax", "foo"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2
    assert r.stdout == ""
    assert "unknown command 'foo'" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_bench_unknown_size_name(capsys):
    assert main(["bench", "--sizes", "S1,S9"]) == 2
    line = _error_line(capsys)
    assert "--sizes" in line and "'S9'" in line and "S1, S2, S3, S4" in line


@pytest.mark.parametrize("size", ["1,256,2,32", "1,256,2,32,x", "1,256,0,32,32", "1,256,2,32,32,9"])
def test_bench_bad_custom_size(size, capsys):
    assert main(["bench", "--size", size]) == 2
    line = _error_line(capsys)
    assert "--size" in line and "B,T,H,K,V" in line and repr(size) in line


@pytest.mark.parametrize("option,value", [("--modes", "bwd"), ("--impls", "cuda")])
def test_bench_bad_choice(option, value, capsys):
    assert main(["bench", option, value]) == 2
    line = _error_line(capsys)
    assert option in line and repr(value) in line


def test_demo_bad_steps(capsys):
    assert main(["demo", "--steps", "0"]) == 2
    assert "--steps" in _error_line(capsys)


def test_floor_only_for_known_devices():
    assert bench.device_peaks("NVIDIA H100 80GB HBM3")[0] == "H100"
    assert bench.device_peaks("cpu") is None
    assert bench.device_peaks("NVIDIA A100-SXM4-80GB") is None
    row = dict(size="S1", op="chunk", impl="xla", mode="fwd", median_ms=2.0, x_fastest=1.0)
    assert "x floor" not in bench.format_table([row])
    assert "x floor" in bench.format_table([dict(row, floor_ms=0.5, x_floor=4.0)])


def test_bench_size_alone_runs_only_that_size_and_writes_only_when_asked(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = ["bench", "--size", "1,20,1,8,8", "--modes", "fwd", "--reps", "1", "--no-fla", "--impls", "xla",
            "--only", "xla"]  # not the cuDNN anchor a GPU adds
    assert main(argv) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.startswith(("S1", "S2", "S3", "S4", "C1"))]
    assert {r[0] for r in rows} == {"C1"}, out
    assert {r[1] for r in rows} == {"chunk", "fused_recurrent"}
    header = next(line for line in out.splitlines() if line.startswith("size"))
    if bench.device_peaks(jax.devices()[0].device_kind) is None:
        assert "x floor" not in header and "no x floor column" in out
    assert list(tmp_path.iterdir()) == []  # nothing written without --out / --save

    assert main([*argv, "--out", "r.json"]) == 0
    data = json.loads((tmp_path / "r.json").read_text())
    assert {r["size"] for r in data["results"]} == {"C1"}
    assert list(tmp_path.iterdir()) == [tmp_path / "r.json"]


def test_bench_only_matching_nothing_says_so(capsys):
    argv = ["bench", "--size", "1,20,1,8,8", "--modes", "fwd", "--reps", "1", "--no-fla", "--only", "nomatch"]
    assert main(argv) == 1
    assert "no case matched --only 'nomatch'" in capsys.readouterr().err


def test_bench_gate_adds_the_gated_rows(capsys):
    argv = ["bench", "--size", "1,20,1,8,8", "--modes", "fwd", "--reps", "1", "--no-fla", "--impls", "xla",
            "--gate", "--only", "xla"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    ops = {line.split()[1] for line in out.splitlines() if line.startswith("C1")}
    assert ops == {"chunk", "fused_recurrent", "chunk+gk", "fused_recurrent+gk"}, out
