"""`make lint`: every float comparison in tests/ and experiments/ states its tolerance.

Checks each call of assert_allclose / allclose / isclose / assert_close (numpy, torch,
torch.testing): it must
- pass the tolerances as `**close(dtype)` / `**EXACT` (tests/tolerances.py), or
- name `rtol=` explicitly, with a literal value that is 0 (with atol=0: bit equality, or
  with atol >= 1e-6: an absolute bound on values of scale ~1) or >= 1e-5 (float32's
  floor), or a value below that on a statement that says `# float64` (tighter is right
  only for float64 results).
numpy's default rtol=1e-7 and torch's float32 default (1.3e-6) are below what float32
results allow across CPUs (tests/tolerances.py says why), so a default is never accepted.
pytest.approx (default rel=1e-6) follows the same rule with its own names: `rel=` >= 1e-5,
or `abs=` alone (an absolute bound, >= 1e-6 when literal), or `**approx_close(dtype)`, or a
statement that says `# float64` (Python floats: schedules, statistics, JSON round trips).
Exits 1 listing file:line and the reason of each call that breaks the rule.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NAMES = {"assert_allclose", "allclose", "isclose", "assert_close"}
FLOAT32_RTOL = 1e-5
ABS_FLOOR = 1e-6


def _number(node: ast.expr) -> float | None:
    try:
        value = ast.literal_eval(node)
    except ValueError:
        return None
    return float(value) if isinstance(value, (int, float)) else None


def problems(path: Path) -> list[str]:
    source = path.read_text()
    lines = source.splitlines()
    found = []
    for node in ast.walk(ast.parse(source, str(path))):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
        if name == "approx":
            found += approx_problems(node, path, lines)
            continue
        if name not in NAMES:
            continue
        where = f"{path.relative_to(REPO)}:{node.lineno}"
        kwargs = {k.arg: k.value for k in node.keywords if k.arg is not None}
        if any(k.arg is None for k in node.keywords):  # **close(dtype) / **EXACT
            continue
        if "rtol" not in kwargs:
            found.append(f"{where}: {name} without rtol= (the default is float64-sized)")
            continue
        rtol, atol = _number(kwargs["rtol"]), _number(kwargs.get("atol", ast.Constant(None)))
        if rtol is None or rtol >= FLOAT32_RTOL:
            continue  # a derived value, or float32's floor or more
        statement = "\n".join(lines[node.lineno - 1 : node.end_lineno])
        if "# float64" in statement:
            continue
        if rtol == 0 and atol is not None and (atol == 0 or atol >= ABS_FLOOR):
            continue
        found.append(
            f"{where}: {name} with rtol={rtol:g}, atol={atol}: below float32's "
            f"{FLOAT32_RTOL:g} (use **close(dtype), rtol=0/atol=0 for bit equality, or say "
            "`# float64`)"
        )
    return found


def approx_problems(node: ast.Call, path: Path, lines: list[str]) -> list[str]:
    """pytest.approx's rel/abs under the rule above; [] when it holds."""
    where = f"{path.relative_to(REPO)}:{node.lineno}"
    if any(k.arg is None for k in node.keywords):  # **approx_close(dtype)
        return []
    kwargs = {k.arg: k.value for k in node.keywords}
    statement = "\n".join(lines[node.lineno - 1 : node.end_lineno])
    if "# float64" in statement:
        return []
    if "rel" in kwargs:
        rel = _number(kwargs["rel"])
        if rel is None or rel >= FLOAT32_RTOL:
            return []
        return [f"{where}: approx with rel={rel:g}: below float32's {FLOAT32_RTOL:g}"]
    if "abs" in kwargs:  # abs alone: pytest ignores rel, an absolute bound
        bound = _number(kwargs["abs"])
        if bound is None or bound >= ABS_FLOOR or bound == 0:
            return []
        return [f"{where}: approx with abs={bound:g} alone: below {ABS_FLOOR:g}"]
    return [
        f"{where}: approx without rel= or abs= (its rel=1e-6 is below float32's "
        f"{FLOAT32_RTOL:g}; say `# float64` for Python floats)"
    ]


def main(paths: list[str]) -> int:
    files = [Path(p).resolve() for p in paths] or sorted(
        [*(REPO / "tests").rglob("*.py"), *(REPO / "experiments").rglob("*.py")]
    )
    found = [line for f in files for line in problems(f)]
    for line in found:
        print(line)
    if found:
        print(f"{len(found)} float comparison(s) without a dtype-sized tolerance")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
