"""benchmarks/compare.py: the same-run comparison of a change against the code before it.
Its verdicts on hand-made rounds, and BASE built as a worktree with a venv of its own
whose rayline is BASE's."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import compare  # noqa: E402


def rounds(values: list[float], better: str) -> list[dict]:
    return [{"figure": (v, better)} for v in values]


@pytest.mark.parametrize(
    ("base", "head", "better", "ratio", "spread", "flagged"),
    [
        # 20 % fewer requests a second in every round: flagged.
        ([100, 110, 90], [80, 88, 72], "higher", 0.8, 0.0, True),
        # 5 % slower p99 in every round: within the 10 % margin.
        ([10, 20, 30], [10.5, 21, 31.5], "lower", 1.05, 0.0, False),
        # 15 % worse but the rounds disagree by more than that: the spread covers it.
        ([100, 100, 100], [50, 85, 90], "higher", 0.85, 0.2, False),
        # 30 % slower with rounds that agree within 2 %: flagged.
        ([1.0, 1.0, 1.0], [1.28, 1.3, 1.32], "lower", 1.3, 0.02, True),
        # Faster is never flagged, however far.
        ([100, 100, 100], [200, 300, 250], "higher", 2.5, 0.5, False),
    ],
)
def test_a_figure_is_flagged_when_worse_by_more_than_its_spread_and_ten_percent(
    base, head, better, ratio, spread, flagged
):
    row = compare.summarize(rounds(base, better), rounds(head, better))["figure"]
    assert row["ratio"] == pytest.approx(ratio, abs=1e-3)
    assert row["spread"] == pytest.approx(spread, abs=1e-3)
    assert row["flagged"] is flagged
    assert row["base"] == base and row["head"] == head


def test_serve_load_figures_are_the_batched_points_each_way_up():
    points = [
        {
            "server": "plain",
            "route": "dqn_act",
            "batching": None,
            "concurrency": 32,
            "rps": 1200.0,
            "p99_ms": 100.0,
        },
        {
            "server": "rayline",
            "route": "dqn_act",
            "batching": True,
            "concurrency": 32,
            "rps": 2400.0,
            "p99_ms": 24.0,
        },
        {
            "server": "rayline",
            "route": "dqn_act",
            "batching": False,
            "concurrency": 32,
            "rps": 900.0,
            "p99_ms": 60.0,
        },
    ]
    figures = compare.serve_load_figures({"points": points})
    assert figures == {
        "plain dqn_act@32 rps": (1200.0, "higher"),
        "plain dqn_act@32 p99_ms": (100.0, "lower"),
        "rayline dqn_act@32 rps": (2400.0, "higher"),
        "rayline dqn_act@32 p99_ms": (24.0, "lower"),
    }
    # The protocol's points (--parts protocol) count too, each form and batch size, the
    # mean of its passes.
    infer = {"form": "json", "rows": 1, "concurrency": 32, "rps": 2000.0, "p99_ms": 30.0}
    again = {**infer, "rps": 1900.0, "p99_ms": 34.0}
    binary = {"form": "binary", "rows": 256, "concurrency": 32, "rps": 900.0, "p99_ms": 50.0}
    protocol = {"points": [infer, binary, again], "json_over_native": {}}
    figures = compare.serve_load_figures({"points": [], "protocol": protocol})
    assert figures == {
        "protocol json rows1@32 rps": (1950.0, "higher"),
        "protocol json rows1@32 p99_ms": (32.0, "lower"),
        "protocol binary rows256@32 rps": (900.0, "higher"),
        "protocol binary rows256@32 p99_ms": (50.0, "lower"),
    }


@pytest.mark.slow
def test_base_is_built_in_a_worktree_whose_venv_imports_its_own_rayline(tmp_path):
    """BASE = the last commit: its worktree, a venv on top of this tree's, and in it
    `import rayline` is BASE's copy while torch and Ray come from this tree's venv."""
    tree, python = compare.build_base("HEAD", work=tmp_path)
    try:
        found = subprocess.run(
            [
                str(python),
                "-c",
                "import rayline, ray, torch; print(rayline.__file__); "
                "print(ray.__file__); print(torch.__file__)",
            ],
            capture_output=True,
            text=True,
            check=True,
            env=compare.clean_env(),
        ).stdout.split()
        assert found[0] == str(tree / "platform" / "rayline" / "__init__.py")
        assert all(path.startswith(sys.prefix) for path in found[1:]), found
        # Built once: a second call reuses the worktree and the venv as they are.
        stamp = python.parents[1] / ".installed"
        made = stamp.stat().st_mtime
        assert compare.build_base("HEAD", work=tmp_path) == (tree, python)
        assert stamp.stat().st_mtime == made
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT)
