"""GPU add-ons (lamina-cuda13, lamina-vulkan, ...) that are installed but cannot load: each is
reported with its reason (a warning at import, lamina.addons(), lamina doctor), the process goes on
on the CPU, and an explicit n_gpu_layers says it is inert and why.

The add-ons here are fake distributions (a dist-info with the entry point, and a package with the
add-on's constants) on PYTHONPATH of a fresh interpreter. A real add-on is built and smoke-tested
by ci/build-wheel + ci/smoke-wheel (CI: the Vulkan add-on on lavapipe)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import lamina
from lamina import _native
import requires

PROBE = textwrap.dedent("""
    import json, sys, warnings
    warnings.simplefilter("always")
    with warnings.catch_warnings(record=True) as caught:
        import lamina
        m = lamina.Model(sys.argv[1], n_gpu_layers=2)
    print(json.dumps({
        "addons": [{"name": a.name, "dist": a.distribution, "loaded": a.loaded, "error": a.error}
                   for a in lamina.addons()],
        "warnings": [f"{w.category.__name__}: {w.message}" for w in caught],
        "reasons": list(m.offload.reasons),
        "doctor": str(lamina.system_info()),
    }))
""")


def fake_addon(site: Path, name: str, library: str, version: str | None = None,
               commit: str | None = None, preload: tuple[str, ...] = (), backend: str = "Fake") -> None:
    pkg = site / f"lamina_{name}"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(textwrap.dedent(f"""
        BACKEND = {backend!r}
        LIBRARY = {library!r}
        LAMINA_VERSION = {version or _native.VERSION!r}
        LLAMA_CPP_COMMIT = {commit or _native.LLAMA_CPP_COMMIT!r}
        PRELOAD = {preload!r}
        RUNTIME_ENV = "LAMINA_FAKE_RUNTIME"
        NEEDS = "needs the fake runtime"
    """))
    info = site / f"lamina_{name}-{_native.VERSION}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: lamina-{name}\nVersion: {_native.VERSION}\n")
    (info / "entry_points.txt").write_text(f"[lamina.backends]\n{name} = lamina_{name}\n")


def probe(site: Path, model: Path, **env: str) -> dict:
    """Import lamina in a fresh interpreter that sees the fake add-ons in ``site`` (and, through
    LAMINA_ADDONS, only them: a real add-on installed here stays out of these tests)."""
    fakes = ",".join(p.name[len("lamina_"):] for p in site.glob("lamina_*") if p.is_dir() and "." not in p.name)
    e = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]),
         "LAMINA_ADDONS": fakes, **env}
    r = subprocess.run([sys.executable, "-c", PROBE, str(model)], capture_output=True, text=True, env=e,
                       timeout=120, cwd=site)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_an_addon_for_another_lamina_is_refused_with_the_reason(tmp_path: Path, tiny_path: Path) -> None:
    fake_addon(tmp_path, "old", str(tmp_path / "libggml-fake.so"), version="0.0.1", commit="abc1234")
    out = probe(tmp_path, tiny_path)
    (a,) = out["addons"]
    assert a["dist"] == "lamina-old" and not a["loaded"]
    assert "built for lamina 0.0.1 (llama.cpp abc1234)" in a["error"]
    assert f"install lamina-old=={_native.VERSION}" in a["error"]
    assert any(w.startswith("RuntimeWarning: lamina: GPU add-on lamina-old") for w in out["warnings"])
    assert "NOT LOADED" in out["doctor"] and "built for lamina 0.0.1" in out["doctor"]
    if "gpu: none" not in out["doctor"]:
        return  # a build with a GPU linked in: n_gpu_layers takes effect
    # the explicit n_gpu_layers is inert, and the warning says why
    inert = [w for w in out["warnings"] if w.startswith("InertSettingWarning")]
    assert len(inert) == 1 and "n_gpu_layers=2 is inert: GPU add-on lamina-old did not load" in inert[0]
    assert any("GPU add-on lamina-old did not load" in r for r in out["reasons"])


def test_an_addon_whose_library_cannot_load_says_why_and_lamina_runs_on(tmp_path: Path, tiny_path: Path) -> None:
    bogus = tmp_path / "libggml-bogus.so"
    bogus.write_text("not a shared library")
    fake_addon(tmp_path, "bogus", str(bogus))
    fake_addon(tmp_path, "gone", str(tmp_path / "libggml-gone.so"))  # deleted by a broken uninstall
    out = probe(tmp_path, tiny_path)
    errors = {a["name"]: a["error"] for a in out["addons"]}
    assert not any(a["loaded"] for a in out["addons"])
    if _native.BACKEND_DL:
        assert "libggml-bogus.so" in errors["bogus"] and "needs the fake runtime" in errors["bogus"]
    else:
        assert "links its backends in" in errors["bogus"]
    assert "is missing (a broken install: reinstall lamina-gone)" in errors["gone"]
    if "gpu: none" in out["doctor"]:
        assert out["reasons"][0].endswith("everything stays on the CPU")


def test_an_explicit_ngl_without_any_gpu_backend_warns_how_to_get_one(tmp_path: Path, tiny_path: Path) -> None:
    out = probe(tmp_path, tiny_path, LAMINA_ADDONS="none")
    if "gpu: none" not in out["doctor"]:
        pytest.skip("this build has a GPU device")
    (inert,) = [w for w in out["warnings"] if w.startswith("InertSettingWarning")]
    if _native.BACKEND_DL:  # the wheel: an add-on adds a GPU
        assert 'no GPU backend is installed' in inert and 'pip install "lamina[cuda13]"' in inert, inert
    else:
        assert "built without a GPU backend" in inert and "GGML_CUDA=ON" in inert, inert
    assert out["doctor"].count("gpu: none: ") == 1


def test_an_addon_for_a_backend_ggml_already_has_is_not_loaded_again(tmp_path: Path, tiny_path: Path) -> None:
    # lamina-cuda12 next to lamina-cuda13 loaded both, and every CUDA device was listed twice; here the
    # backend already registered is lamina's own CPU backend, so no GPU is needed
    fake_addon(tmp_path, "cpu2", str(tmp_path / "libggml-cpu2.so"), backend="CPU")
    out = probe(tmp_path, tiny_path)
    (a,) = out["addons"]
    assert not a["loaded"]
    assert "ggml already has the CPU backend, from lamina itself" in a["error"], a["error"]
    assert "pip uninstall lamina-cpu2" in a["error"]


def test_lamina_addons_none_loads_none(tmp_path: Path, tiny_path: Path) -> None:
    fake_addon(tmp_path, "bogus", str(tmp_path / "libggml-bogus.so"))
    assert probe(tmp_path, tiny_path, LAMINA_ADDONS="none")["addons"] == []
    assert [a["name"] for a in probe(tmp_path, tiny_path, LAMINA_ADDONS="other")["addons"]] == []
    assert [a["name"] for a in probe(tmp_path, tiny_path, LAMINA_ADDONS="bogus")["addons"]] == ["bogus"]


def test_a_library_that_is_no_backend_is_refused(tmp_path: Path, tiny_path: Path) -> None:
    requires.portable()  # backend libraries load at run time only in portable builds
    # lamina's own libggml-base.so: a real library, already loaded, with no ggml_backend_init
    base = Path(lamina._core.PACKAGE_DIR) / "libggml-base.so"
    fake_addon(tmp_path, "base", str(base))
    (a,) = probe(tmp_path, tiny_path)["addons"]
    assert not a["loaded"] and "ggml_backend_init" in a["error"]


@pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler")
def test_a_missing_runtime_library_is_named(tmp_path: Path, tiny_path: Path) -> None:
    """The classic: the backend needs libcudart.so.12 and nothing provides it. Here a library that
    needs libghost.so.1, which is gone; its pip-package preload is looked for and not found."""
    requires.portable()
    (tmp_path / "ghost.c").write_text("int ghost(void) { return 1; }\n")
    (tmp_path / "backend.c").write_text("int ghost(void); int not_a_backend(void) { return ghost(); }\n")
    subprocess.run(["cc", "-shared", "-fPIC", "-Wl,-soname,libghost.so.1", "-o", tmp_path / "libghost.so.1",
                    tmp_path / "ghost.c"], check=True)
    subprocess.run(["cc", "-shared", "-fPIC", "-o", tmp_path / "libggml-ghost.so", tmp_path / "backend.c",
                    tmp_path / "libghost.so.1"], check=True)
    (tmp_path / "libghost.so.1").unlink()
    fake_addon(tmp_path, "ghost", str(tmp_path / "libggml-ghost.so"), preload=("libghost.so.1",))
    (a,) = probe(tmp_path, tiny_path)["addons"]
    assert "libghost.so.1: cannot open shared object file" in a["error"]
    assert "[not found in pip packages: libghost.so.1]" in a["error"]
    # a pip package that has it (site-packages/nvidia/<name>/lib/): preloaded, then the backend
    # library loads and is refused by ggml for what it is (not a ggml backend), not for the runtime
    lib = tmp_path / "nvidia" / "ghost" / "lib"
    lib.mkdir(parents=True)
    subprocess.run(["cc", "-shared", "-fPIC", "-Wl,-soname,libghost.so.1", "-o", lib / "libghost.so.1",
                    tmp_path / "ghost.c"], check=True)
    (a,) = probe(tmp_path, tiny_path)["addons"]
    assert "cannot open shared object file" not in a["error"] and a["error"], a
    # the local-toolkit mode skips the pip packages: the system's library path has no libghost
    (a,) = probe(tmp_path, tiny_path, LAMINA_FAKE_RUNTIME="system")["addons"]
    assert "libghost.so.1: cannot open shared object file" in a["error"]


def test_every_addon_distribution_pins_this_exact_lamina() -> None:
    """lamina-cuda13==X requires lamina==X and lamina[cuda13] names lamina-cuda13==X: one version
    everywhere, since an add-on's library is only compatible with the lamina it was built with."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    root = Path(__file__).resolve().parent.parent
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    version = project["version"]
    names = sorted(p.parent.name for p in (root / "addons").glob("*/pyproject.toml"))
    assert names == ["cuda12", "cuda13", "rocm", "vulkan"]
    for name in names:
        assert project["optional-dependencies"][name] == [f"lamina-{name}=={version}"]
        addon = tomllib.loads((root / "addons" / name / "pyproject.toml").read_text())
        assert addon["project"]["name"] == f"lamina-{name}" and addon["project"]["version"] == version
        assert f"lamina=={version}" in addon["project"]["dependencies"]
        assert addon["project"]["entry-points"]["lamina.backends"] == {name: f"lamina_{name}"}
        assert addon["tool"]["scikit-build"]["cmake"]["define"]["LAMINA_ADDON"] == name
