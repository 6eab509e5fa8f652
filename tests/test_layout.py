"""The layout rules of DESIGN §4, checked on the source: no import cycles (imports inside
functions count), kernels/ never imports ops/, the core never imports the application
(ddpm_fast/cli/), one file stem per op in every layer, the C++ mirror of contract.py, every
"DESIGN §n" resolving to a heading of docs/DESIGN.md, and `import ddpm_fast` without triton."""
import ast
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from ddpm_fast import contract

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "ddpm_fast"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_graph() -> dict[str, set[str]]:
    """module → the ddpm_fast modules it imports anywhere in its body (a `from P import name`
    counts as importing P.name when that is a module)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                           for alias in node.names]
            else:
                continue
            edges.update(t for t in targets if t in modules and t != name)
        graph[name] = edges
    return graph


def test_no_import_cycles():
    graph = _import_graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: finished

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                cycle = path[path.index(target):] + [target]
                pytest.fail("import cycle: " + " → ".join(cycle))
            if target not in state:
                visit(target, path + [target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_layering():
    graph = _import_graph()
    for module, targets in graph.items():
        if module.startswith("ddpm_fast.kernels"):
            assert not any(t.startswith("ddpm_fast.ops") for t in targets), f"{module} imports ops/: {targets}"
        if not module.startswith("ddpm_fast.cli"):
            assert not any(t.startswith("ddpm_fast.cli") for t in targets), f"core module {module} imports the CLI"


def _stems(folder: Path, suffix: str) -> set[str]:
    return {p.stem for p in folder.glob(f"*{suffix}") if not p.stem.startswith("_")}


def test_one_stem_per_op():
    ops = _stems(PACKAGE / "ops", ".py")
    assert ops == {"attention", "conv2d", "diffusion_step", "group_norm_silu", "noise", "vb_terms"}
    assert _stems(PACKAGE / "kernels", ".py") <= ops
    # beside the ops' references, the papers' samplers: q_/p_ maths (diffusion.py), DPM-Solver++ (dpm_solver.py),
    # classifier-free and classifier guidance (guidance.py)
    assert _stems(PACKAGE / "reference", ".py") == ops | {"diffusion", "dpm_solver", "guidance"}
    compiled = _stems(ROOT / "csrc" / "cpu", ".cpp")
    assert compiled <= ops and compiled == _stems(ROOT / "csrc" / "cuda", ".cu") == _stems(ROOT / "csrc", ".h")


def _cpp_constants() -> dict[str, str]:
    text = (ROOT / "csrc" / "common" / "contract.h").read_text()
    return dict(re.findall(r"constexpr\s+[\w:]+\s+(k\w+)\s*=\s*([^;]+);", text))


def _float32(value: float) -> float:
    return struct.unpack("f", struct.pack("f", value))[0]


def test_cpp_contract_mirrors_python():
    cpp = _cpp_constants()
    integer = {"kNoiseStreamVersion": contract.NOISE_STREAM_VERSION, "kPhiloxM0": contract.PHILOX_M0,
               "kPhiloxM1": contract.PHILOX_M1, "kPhiloxW0": contract.PHILOX_W0, "kPhiloxW1": contract.PHILOX_W1,
               "kPhiloxRounds": contract.PHILOX_ROUNDS, "kUint32Range": contract.UINT32_RANGE,
               "kStepColumns": contract.NUM_STEP_COLUMNS, "kTermColumns": contract.NUM_TERM_COLUMNS}
    real = {"kUniformScale": contract.UNIFORM_SCALE, "kBoxMullerMinU": contract.BOX_MULLER_MIN_U,
            "kBinHalfWidth": contract.BIN_HALF_WIDTH, "kEdgeBin": contract.EDGE_BIN,
            "kLearnedLog": contract.LEARNED_VARIANCES["learned"]}
    assert set(cpp) == set(integer) | set(real)
    for name, value in integer.items():
        literal = cpp[name].removesuffix("u").replace("int64_t{1} << 32", str(1 << 32))
        assert int(literal, 0) == value, name
    for name, value in real.items():
        assert _float32(float(cpp[name].removesuffix("f"))) == _float32(value), name
    # each constant is defined once: no other C++ file redefines it or spells it as a literal
    for path in (ROOT / "csrc").rglob("*"):
        if path.suffix in (".h", ".cpp", ".cu") and path.name != "contract.h":
            text = path.read_text()
            for name in cpp:
                assert not re.search(rf"constexpr\s+[\w:]+\s+{name}\b", text), f"{path} redefines {name}"
            for literal in ("0xD2511F53", "0xCD9E8D57", "0x9E3779B9", "0xBB67AE85", "4.6566127342e-10"):
                assert literal not in text, f"{path} spells {literal} instead of using common/contract.h"


def _design_headings() -> set[int]:
    text = (ROOT / "docs" / "DESIGN.md").read_text()
    return {int(n) for n in re.findall(r"^## (\d+)\. ", text, flags=re.MULTILINE)}


def _tracked_files() -> list[Path]:
    names = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    if not names:
        pytest.skip("not a git checkout")
    return [ROOT / n for n in names if n.endswith((".py", ".h", ".cpp", ".cu", ".md", ".toml", "Makefile", "run"))
            and not n.startswith("benchmarks/results/")]  # committed reports are records of past runs


def test_design_references_resolve():
    headings = _design_headings()
    assert headings == set(range(1, 11))
    cited = set()
    for path in _tracked_files():
        for first, second in re.findall(r"DESIGN §(\d+)(?:\s*[-–/,]\s*§?(\d+))?", path.read_text()):
            cited |= {(path.name, int(n)) for n in (first, second) if n}
    assert cited, "no DESIGN § reference found: the pattern is wrong"
    assert not [(name, n) for name, n in cited if n not in headings]


def test_no_reference_outside_the_repo():
    pattern = re.compile(r"KINDS\.md|shared/DESIGN|\b[Ii]ssue #?\d+|\b[Tt]he issue\b")
    found = [f"{p.relative_to(ROOT)}: {m.group(0)}" for p in _tracked_files() for m in pattern.finditer(p.read_text())
             if p.name != "test_layout.py"]
    assert not found


def test_import_without_triton(tmp_path):
    # a machine without triton (macOS, Windows): the reference and CPU paths still work
    code = """
import importlib.abc, sys
class NoTriton(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] == "triton":
            raise ModuleNotFoundError(f"No module named {name!r}")
sys.meta_path.insert(0, NoTriton())
import ddpm_fast as df
model = df.UNet.small().eval()
x = df.Sampler(model, df.NoiseSchedule.linear(20), backend="reference").sample(2, seed=0)
assert x.shape == (2, 1, 16, 16) and bool(x.isfinite().all())
try:
    df.ops.group_norm_silu(x, model.norm_out.weight[:1], model.norm_out.bias[:1], 1, impl="triton")
except ModuleNotFoundError as error:
    assert "triton" in str(error)
else:
    raise AssertionError("impl='triton' without triton must raise")
assert "triton" not in sys.modules
print("ok")
"""
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}  # no TRITON_INTERPRET from conftest
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
