"""The classes of failure real transformers models showed the exporter and the tracer
(issue 12), each on a small model of tests/python/trace_models.py, and the
command line's one-line errors.

Covered: a weight read through `.T` is a weight read, never a literal (and a
constant that holds a weight's values is refused); layers that take different
branches get a helper per variant, not one loop; nn.Sequential works;
`torch.functional` functions keep their public names; a constant minus a size
and a floor division are written as such; a cast only the bfloat16 probe runs
is written; a module under two paths reads its weights by its name under the
caller; a loop over time steps becomes `for t in range(T)`, and other ops on
other probes or ints read from tensor values (.tolist() into split) are
refused with the reason; exporting from the model file's own folder works; a
--set typo, an FMX_PYTHON without torch and a failing model give one line and
exit 2; FMX_PYTHON=python3 is found on PATH.
"""
import os
import pathlib
import re
import subprocess

import pytest
import torch

from fmx.dataflow import Flow
from fmx.export import export, op_name
from fmx.tracer import TracerError, Writer, write_pack

ROOT = pathlib.Path(__file__).resolve().parents[2]
FMX = os.environ.get("FMX_BIN", str(ROOT / "build" / "fmx"))
MODELS = "tests/python/trace_models.py"


def fmx(*args, cwd=ROOT, env=None):
    return subprocess.run([FMX, *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=600, env=env)


def traced(tmp_path, name):
    """(fmx verify --probes all's result, the code the tracer wrote) for a model of trace_models.py."""
    pack = tmp_path / name
    export(f"{MODELS}:{name}", str(pack), quiet=True)
    code, _ = write_pack(str(pack))  # what `fmx trace` writes, then `fmx trace --verify`'s check
    out = tmp_path / f"{name}.py"
    out.write_text(code)
    return fmx("verify", pack, out, "--probes", "all"), code


def matched(res):
    return res.returncode == 0 and re.search(r"MATCH: (\d+)/\1 all probe calls", res.stdout)


def test_weight_read_through_T_is_a_weight_read(tmp_path):
    res, code = traced(tmp_path, "t_linear")
    assert matched(res), res.stdout + res.stderr
    assert "torch.tensor(" not in code
    assert 'weights[prefix + "weight"].t()' in code
    assert "for i in range(2):" in code  # the two identical blocks still roll


def test_constant_holding_a_weight_is_refused():
    lin = torch.nn.Linear(4, 4)
    flow = Flow(lin, [])
    const = flow.encode(lin.weight.detach().clone())  # a copy the trace did not see being made
    assert const["weight"] == "weight"
    assert "weight" not in flow.encode(torch.ones(4, 4))
    w = Writer({})
    with pytest.raises(TracerError, match="holds the values of the weight 'weight'"):
        w.arg(const, None, None)


def test_layers_taking_other_branches_get_a_helper_per_variant(tmp_path):
    res, code = traced(tmp_path, "alternating")
    assert matched(res), res.stdout + res.stderr
    assert "for i in range" not in code  # sliding, global, sliding, global: no run of one program
    helpers = re.findall(r"^def (\w+)\(", code, re.M)
    assert len(helpers) == 3 and "forward" in helpers, code  # one helper per variant
    assert all(f'"layers.{i}."' in code for i in range(4))


@pytest.mark.parametrize("name", ["with_sequential", "sequential"])
def test_sequential_works(tmp_path, name):
    res, code = traced(tmp_path, name)
    assert matched(res), res.stdout + res.stderr + code
    assert "for i in range" not in code
    compile(code, name, "exec")


def test_torch_functional_keeps_public_names():
    assert op_name(torch.functional.split) == "torch.split"
    assert op_name(torch.functional.einsum) == "torch.einsum"
    assert op_name(torch.functional.norm) == "torch.norm"


def test_constant_minus_size_and_floor_division(tmp_path):
    res, code = traced(tmp_path, "sizes")
    assert matched(res), res.stdout + res.stderr
    assert re.search(r"128 - x\.size\(1\)", code) and re.search(r"x\.size\(1\) // 2", code), code


def test_cast_only_bfloat16_runs_is_written(tmp_path):
    res, code = traced(tmp_path, "cast_norm")
    assert matched(res), res.stdout + res.stderr  # the bfloat16 probes included
    assert code.count(".to(") >= 2, code


def test_module_under_two_paths_reads_its_weights_by_its_name_there(tmp_path):
    res, code = traced(tmp_path, "shared")
    assert matched(res), res.stdout + res.stderr
    assert '"embed_tokens.weight"' in code and "..weight" not in code


def test_loop_over_time_steps_becomes_a_loop(tmp_path):
    res, code = traced(tmp_path, "time_loop")
    assert matched(res), res.stdout + res.stderr + code  # lengths 6 to 64: one program
    assert "for t in range(x.size(1)):" in code and "x[:, t]" in code, code
    assert code.count("torch.tanh(") == 1


def one_error_line(res, command):
    """The failure is said in one line (after the command's progress lines, which
    start with "fmx CMD: " and say what it is doing), never a traceback."""
    lines = res.stderr.strip().splitlines()
    assert lines and "Traceback" not in res.stderr, res.stderr
    assert all(line.startswith((f"fmx {command}: ", f"fmx.{command}: ")) for line in lines), res.stderr
    return lines[-1]


def test_other_ops_on_other_probes_are_refused_with_the_reason(tmp_path):
    pack = tmp_path / "branchy"
    export("tests/python/flow_models.py:branchy", str(pack), quiet=True)
    with pytest.raises(TracerError, match="other ops on other probes"):
        write_pack(str(pack))
    res = fmx("trace", pack, "-o", tmp_path / "b.py")
    assert res.returncode == 2, res.stderr
    assert "other ops on other probes" in one_error_line(res, "trace")
    assert not (tmp_path / "b.py").exists()


def test_ints_that_follow_the_data_are_refused_with_the_reason(tmp_path):
    pack = tmp_path / "routed"
    export(f"{MODELS}:routed", str(pack), quiet=True)
    with pytest.raises(TracerError, match=r"torch.Tensor.tolist at op \d+\): an int that follows the data"):
        write_pack(str(pack))


def test_export_from_the_model_files_own_folder(tmp_path):
    (tmp_path / "mymodel.py").write_text((ROOT / MODELS).read_text())
    res = fmx("export", "mymodel.py:t_linear", "-o", "out", "--quiet", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "out" / "task.json").exists()


def test_bad_requests_give_one_line_and_exit_2(tmp_path):
    res = fmx("export", "examples/models/qwen2.py:build", "-o", tmp_path / "a", "--set", "num_hiden_layers=1")
    assert res.returncode == 2 and "num_hiden_layers" in one_error_line(res, "export")
    res = fmx("export", f"{MODELS}:t_linear", "-o", tmp_path / "b", "--set", "width=3")
    assert res.returncode == 2 and "width" in one_error_line(res, "export")
    # an interpreter without torch (python3 -S: no site packages)
    wrapper = tmp_path / "py-without-torch"
    wrapper.write_text("#!/bin/sh\nexec /usr/bin/python3 -S \"$@\"\n")
    wrapper.chmod(0o755)
    env = dict(os.environ, FMX_PYTHON=str(wrapper))
    export(f"{MODELS}:sequential", str(tmp_path / "pack"), quiet=True)
    for args in (["export", f"{MODELS}:t_linear", "-o", tmp_path / "c"], ["trace", tmp_path / "pack"]):
        res = fmx(*args, env=env)
        assert res.returncode == 2 and "FMX_PYTHON" in one_error_line(res, args[0]), res.stderr


def test_fmx_python_is_looked_up_on_path(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").symlink_to("/usr/bin/python3")
    env = dict(os.environ, FMX_PYTHON="python3", PATH=f"{bin_dir}:{os.environ.get('PATH', '')}")
    res = fmx("export", f"{MODELS}:t_linear", "-o", tmp_path / "p", "--quiet", env=env)
    assert res.returncode == 0, res.stderr
