"""Build and import degradation: pure-Python install, disabled extension, mismatched or broken .so."""
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
PROBE = ("import torch, fastdd.ops as ops, fastdd.info as info; "
         "x = torch.tensor([[1.0, 2.0], [3.0, 4.0]]); "
         "print(ops.segment_mean(x, torch.tensor([0, 0]), 1).tolist()); "
         "print(info.collect()['ops']['segment_mean']['cpu'])")


def _run(code, cwd, env_extra=None, pythonpath=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTDD_")}
    env.update(env_extra or {})
    if pythonpath:
        env["PYTHONPATH"] = str(pythonpath)
        # An editable install's finder would otherwise resolve fastdd._C from the source checkout.
        code = ("import sys; sys.meta_path[:] = [f for f in sys.meta_path if 'Editable' not in "
                "getattr(f, '__name__', type(f).__name__)]; " + code)
    return subprocess.run([sys.executable, "-W", "always", "-c", code], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def _copy_package(tmp_path):
    dest = tmp_path / "site" / "fastdd"
    shutil.copytree(REPO / "fastdd", dest, ignore=shutil.ignore_patterns("__pycache__"))
    return dest


def test_disabled_extension_falls_back_to_reference(tmp_path):
    out = _run(PROBE, tmp_path, {"FASTDD_DISABLE_EXT": "1"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["[[2.0, 3.0]]", "reference (pure torch)"]


def test_info_reports_extension(tmp_path):
    out = _run("import fastdd.info as i; i.main()", tmp_path)
    assert out.returncode == 0, out.stderr
    assert "CPU extension" in out.stdout and "segment_mean" in out.stdout
    # fastdd ships no CUDA C++: info must name Triton as what serves CUDA tensors, float64 going to the reference.
    assert "CUDA tensors  : Triton kernels (fastdd._C holds CPU kernels only" in out.stdout
    assert "| Triton (float64: reference)" in out.stdout and "CUDA extension:" not in out.stdout


@pytest.mark.skipif(not list((REPO / "fastdd").glob("_C*.so")), reason="extension not built in this checkout")
def test_torch_version_mismatch_warns_once_and_uses_reference(tmp_path):
    pkg = _copy_package(tmp_path)
    (pkg / "_build_info.py").write_text("TORCH_VERSION = '0.0.0'\nWITH_CUDA = False\n")
    out = _run(PROBE, tmp_path, pythonpath=pkg.parent)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[-1] == "reference (pure torch)"
    assert out.stderr.count("built against torch 0.0.0") == 1


@pytest.mark.skipif(not list((REPO / "fastdd").glob("_C*.so")), reason="extension not built in this checkout")
def test_broken_shared_object_warns_once_never_crashes(tmp_path):
    pkg = _copy_package(tmp_path)
    for so in pkg.glob("_C*.so"):
        so.write_bytes(b"\x7fELF this is not a shared object")
    out = _run(PROBE, tmp_path, pythonpath=pkg.parent)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[-1] == "reference (pure torch)"
    assert out.stderr.count("fastdd._C failed to load") == 1


@pytest.mark.slow
def test_pure_python_install_with_build_ext_0(tmp_path):
    target = tmp_path / "site"
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns("build", "*.so", "_build_info.py", "__pycache__",
                                                             ".git", "*.egg-info", "runs"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTDD_")}
    env["FASTDD_BUILD_EXT"] = "0"
    res = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-build-isolation", "--no-deps",
                          "--target", str(target), str(src)], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    assert not list((target / "fastdd").glob("_C*.so"))
    out = _run(PROBE, tmp_path, pythonpath=target)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["[[2.0, 3.0]]", "reference (pure torch)"]
