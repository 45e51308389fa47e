import json
import math
import os
import subprocess
import sys

import matplotlib.image
import numpy as np
import pytest
import torch

from loradrop import Plan, Site
from loradrop import report
from loradrop.report import (
    _bin_edges,
    _format_cell,
    _heatmap_figure,
    _heatmap_matrix,
    _norms_by_layer,
    _retained_mask,
    _sample_ratio_matrix,
    aggregate_runs,
    atomic_write_bytes,
    importance_heatmap,
    output_norm_histograms,
    results_table,
    sample_ratio_heatmap,
    write_json,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# "v" lacks layers 0 and 2, "q" lacks layer 3
IMP = {"q": {0: 0.2, 1: 0.5, 2: 0.3}, "v": {1: 0.75, 3: 0.25}}
PLAN = Plan(layers={"q": [0, 1, 2], "v": [1, 3]}, retained={"q": [1, 2], "v": [1]})


def assert_png(path, min_side=100):
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[2] in (3, 4)
    assert min(image.shape[:2]) >= min_side
    assert image.std() > 0  # something was drawn
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp files left


def test_heatmap_matrix_divides_each_row_by_its_max_and_blanks_missing_layers():
    labels, layers, matrix = _heatmap_matrix(IMP)
    assert labels == ["q", "v"]
    assert layers == [0, 1, 2, 3]
    expected = np.array([[0.4, 1.0, 0.6, np.nan], [np.nan, 1.0, np.nan, 1 / 3]])
    np.testing.assert_allclose(matrix, expected, equal_nan=True)


def test_heatmap_matrix_of_several_runs_labels_rows_run_slash_type():
    labels, layers, matrix = _heatmap_matrix({"rte": IMP, "mrpc": {"q": {0: 1.0, 1: 3.0}}})
    assert labels == ["rte/q", "rte/v", "mrpc/q"]
    assert layers == [0, 1, 2, 3]
    np.testing.assert_allclose(matrix[2], [1 / 3, 1.0, np.nan, np.nan], equal_nan=True)


def test_heatmap_matrix_accepts_layer_keys_that_went_through_json():
    _, layers, matrix = _heatmap_matrix(json.loads(json.dumps(IMP)))
    assert layers == [0, 1, 2, 3]
    np.testing.assert_allclose(matrix[0, :3], [0.4, 1.0, 0.6])


def test_retained_mask_marks_the_plans_kept_layers():
    mask = _retained_mask(IMP, [0, 1, 2, 3], PLAN)
    assert mask.tolist() == [[False, True, True, False], [False, True, False, False]]
    several = _retained_mask({"a": IMP, "b": {"v": IMP["v"]}}, [0, 1, 2, 3], {"a": PLAN, "b": PLAN})
    assert several.tolist() == [[False, True, True, False], [False, True, False, False], [False, True, False, False]]


def test_heatmap_figure_prints_values_and_boxes_marked_cells():
    _, layers, matrix = _heatmap_matrix(IMP)
    marks = _retained_mask(IMP, layers, PLAN)
    fig = _heatmap_figure(matrix, ["q", "v"], layers, colour_label="I / max I", value_format=".2f", title=None,
                          marks=marks, mark_label="retained")
    ax = fig.axes[0]
    assert sorted(t.get_text() for t in ax.texts) == ["0.33", "0.40", "0.60", "1.00", "1.00"]  # NaN cells blank
    assert len(ax.patches) == 3


def test_heatmap_figure_skips_values_on_wide_grids():
    matrix = np.random.default_rng(0).random((2, 40))
    fig = _heatmap_figure(matrix, ["q", "v"], list(range(40)), colour_label="I", value_format=".2f", title=None)
    assert len(fig.axes[0].texts) == 0


def test_importance_heatmap_writes_a_png(tmp_path):
    path = importance_heatmap(IMP, tmp_path / "figs" / "importance.png", plan=PLAN, title="RTE")
    assert path == tmp_path / "figs" / "importance.png"
    assert_png(path)


def test_importance_heatmap_writes_other_formats_and_rejects_unknown_suffixes(tmp_path):
    assert importance_heatmap(IMP, tmp_path / "i.pdf").read_bytes().startswith(b"%PDF")
    with pytest.raises(ValueError, match=r"'i\.txt'.*suffix must be one of"):
        importance_heatmap(IMP, tmp_path / "i.txt")
    assert not (tmp_path / "i.txt").exists()


@pytest.mark.parametrize(
    "importance,match",
    [
        ({}, "importance is empty"),
        ({"q": {}}, "module type 'q': expected a non-empty dict"),
        ({"q": {0: 0.5, 1: -0.1}}, r"module type 'q', layer 1: importance -0.1 is not a finite number >= 0"),
        ({"q": {0: math.nan}}, "module type 'q', layer 0: importance nan"),
        ({"q": {0: 0.0, 1: 0.0}}, "importance of 'q' is zero in every layer"),
        ({"q": {"first": 1.0}}, "layer key 'first' is not a layer index"),
        ({"rte": {}, "mrpc": IMP}, "importance of run 'rte' is empty"),
        ({"rte": IMP, "q": {0: 1.0}}, "mixes per-type importance with per-run importance"),
        ({"rte": {"q": {0: "high"}}}, "run 'rte', module type 'q', layer 0: importance 'high'"),
    ],
)
def test_heatmap_matrix_rejects_bad_importance(importance, match):
    with pytest.raises(ValueError, match=match):
        _heatmap_matrix(importance)


@pytest.mark.parametrize(
    "importance,plan,match",
    [
        ({"q": IMP["q"], "k": {0: 1.0}}, PLAN, r"the plan has no module type 'k'; it has \['q', 'v'\]"),
        ({"rte": IMP}, PLAN, "dict of run name -> Plan for several runs"),
        (IMP, {"rte": PLAN}, "must be a Plan for one run's importance"),
        ({"rte": IMP, "mrpc": IMP}, {"rte": PLAN}, r"no plan for run 'mrpc'; plans are given for \['rte'\]"),
    ],
)
def test_importance_heatmap_rejects_plans_that_do_not_fit(tmp_path, importance, plan, match):
    with pytest.raises(ValueError, match=match):
        importance_heatmap(importance, tmp_path / "i.png", plan=plan)
    assert not list(tmp_path.iterdir())


# -- Figure 5 ---------------------------------------------------------------------------------------
def test_sample_ratio_matrix_sorts_ratios_and_keeps_raw_importance():
    ratios, layers, matrix = _sample_ratio_matrix({1.0: {0: 0.6, 1: 0.4}, 0.1: {0: 0.5, 2: 0.5}}, "q")
    assert ratios == [0.1, 1.0]
    assert layers == [0, 1, 2]
    np.testing.assert_allclose(matrix, [[0.5, np.nan, 0.5], [0.6, 0.4, np.nan]], equal_nan=True)


def test_sample_ratio_matrix_picks_the_module_type_from_whole_importances():
    per_ratio = {"0.2": json.loads(json.dumps(IMP)), "0.1": {"q": {0: 1.0}, "v": {0: 1.0}}}
    ratios, layers, matrix = _sample_ratio_matrix(per_ratio, "v")
    assert ratios == [0.1, 0.2]
    np.testing.assert_allclose(matrix, [[1.0, np.nan, np.nan], [np.nan, 0.75, 0.25]], equal_nan=True)


@pytest.mark.parametrize(
    "importances,match",
    [
        ({}, "importances is empty"),
        ({0.0: {0: 1.0}}, r"sample ratio 0\.0 is invalid: must be in \(0, 1\]"),
        ({1.5: {0: 1.0}}, r"sample ratio 1\.5 is invalid"),
        ({0.5: IMP}, r"sample ratio 0\.5 has no module type 'k'; it has \['q', 'v'\]"),
        ({0.5: {0: math.inf}}, r"sample ratio 0\.5, layer 0: importance inf"),
    ],
)
def test_sample_ratio_matrix_rejects_bad_input(importances, match):
    with pytest.raises(ValueError, match=match):
        _sample_ratio_matrix(importances, "k")


def test_sample_ratio_heatmap_writes_a_png(tmp_path):
    per_ratio = {a: {layer: (layer + 1) * a for layer in range(6)} for a in (0.1, 0.5, 1.0)}
    assert_png(sample_ratio_heatmap(per_ratio, tmp_path / "alpha.png", "query"))


# -- Figure 2 ---------------------------------------------------------------------------------------
def norms(values):
    return torch.tensor(values, dtype=torch.float64)


def test_norms_by_layer_groups_sites_by_layer_then_type():
    grouped = _norms_by_layer({
        Site("v", 1, "l.1.v"): norms([3.0]),
        Site("q", 1, "l.1.q"): norms([1.0, 2.0]),
        Site("q", 0, "l.0.q"): norms([0.5]),
    })
    assert list(grouped) == [0, 1]
    assert list(grouped[1]) == ["q", "v"]
    np.testing.assert_array_equal(grouped[1]["q"], [1.0, 2.0])


@pytest.mark.parametrize(
    "example_norms,match",
    [
        ({}, "example_norms is empty: record them with"),
        ({Site("q", 0, "l.0.q"): norms([])}, r"site 'l\.0\.q': expected a non-empty 1-D tensor.*shape \(0,\)"),
        ({Site("q", 0, "l.0.q"): norms([[1.0]])}, r"shape \(1, 1\)"),
        ({Site("q", 0, "l.0.q"): norms([1.0, math.nan])}, r"site 'l\.0\.q': its output norms are not all finite"),
        ({Site("q", 0, "a.0.q"): norms([1.0]), Site("q", 0, "b.0.q"): norms([1.0])},
         "two sites are module type 'q' of layer 0"),
    ],
)
def test_norms_by_layer_rejects_bad_input(example_norms, match):
    with pytest.raises(ValueError, match=match):
        _norms_by_layer(example_norms)


def test_bin_edges_go_logarithmic_only_for_positive_values_spanning_decades():
    edges, log = _bin_edges([np.array([1.0, 10.0]), np.array([1e4])], bins=4)
    assert log
    np.testing.assert_allclose(edges, [1.0, 10.0, 100.0, 1e3, 1e4])
    edges, log = _bin_edges([np.array([0.0, 1e4])], bins=4)
    assert not log
    np.testing.assert_allclose(edges, [0.0, 2500.0, 5000.0, 7500.0, 1e4])
    assert not _bin_edges([np.array([1.0, 999.0])], bins=4)[1]


def test_output_norm_histograms_writes_a_png(tmp_path):
    gen = torch.Generator().manual_seed(0)
    example_norms = {
        Site(t, layer, f"l.{layer}.{t}"): torch.exp(torch.randn(50, generator=gen, dtype=torch.float64) + layer + scale)
        for layer in range(5) for t, scale in (("query", 0.0), ("value", 2.0))
    }
    assert_png(output_norm_histograms(example_norms, tmp_path / "norms.png", bins=20))


@pytest.mark.parametrize("bins", [0, -3, 2.5, True])
def test_output_norm_histograms_rejects_bad_bins(tmp_path, bins):
    with pytest.raises(ValueError, match=f"bins={bins!r} is invalid"):
        output_norm_histograms({Site("q", 0, "l.0.q"): norms([1.0])}, tmp_path / "n.png", bins=bins)


# -- tables -----------------------------------------------------------------------------------------
def test_results_table_exact_markdown():
    rows = [
        {"method": "lora", "trainable_params": 12345, "metric": 0.81234, "metric_std": 0.01},
        {"method": "lora-drop", "trainable_params": 6000, "metric": 81.5, "note": "a|b"},
    ]
    assert results_table(rows) == (
        "| method    | trainable_params |          metric | note |\n"
        "| --------- | ---------------: | --------------: | ---- |\n"
        "| lora      |           12,345 | 0.8123 ± 0.0100 |      |\n"
        "| lora-drop |            6,000 |           81.50 | a\\|b |\n"
    )


def test_results_table_with_chosen_columns_shows_a_listed_std_column_on_its_own():
    rows = [{"method": "lora", "metric": 0.5, "metric_std": 0.25, "seed": 1}]
    assert results_table(rows, columns=["metric", "metric_std"]) == (
        "| metric | metric_std |\n"
        "| -----: | ---------: |\n"
        "| 0.5000 |     0.2500 |\n"
    )


@pytest.mark.parametrize(
    "value,std,text",
    [
        (1234567, None, "1,234,567"),
        (0.0, None, "0"),
        (100.0, None, "100.0"),
        (-0.123456, None, "-0.1235"),
        (1.2346e-5, None, "1.235e-05"),
        (123456.7, None, "123,457"),
        (math.nan, None, "nan"),
        (np.float32(0.5), None, "0.5000"),
        (np.int64(4096), None, "4,096"),
        (True, None, "True"),
        (81.234, 1.2, "81.23 ± 1.20"),
        (3, 0.5, "3.000 ± 0.500"),
        (None, None, ""),
    ],
)
def test_format_cell(value, std, text):
    assert _format_cell(value, std) == text


@pytest.mark.parametrize(
    "rows,columns,match",
    [
        ([], None, "needs at least one row"),
        ([{"a": 1}, ["b", 2]], None, "row 1 is a list, not a dict"),
        ([{"a": 1}], ["a", "acc"], r"columns \['acc'\] occur in no row; the rows have \['a'\]"),
    ],
)
def test_results_table_rejects_bad_input(rows, columns, match):
    with pytest.raises(ValueError, match=match):
        results_table(rows, columns)


def test_aggregate_runs_mean_and_sample_std_per_group_in_first_seen_order():
    rows = [
        {"method": "lora-drop", "seed": 0, "metric": 0.8, "loss": 1.0},
        {"method": "lora", "seed": 0, "metric": 0.5, "loss": 2.0},
        {"method": "lora-drop", "seed": 1, "metric": 0.9, "loss": 3.0},
        {"method": "lora-drop", "seed": 2, "metric": 0.7, "loss": 5.0},
    ]
    out = aggregate_runs(rows, value_keys=("metric", "loss"))
    assert [r["method"] for r in out] == ["lora-drop", "lora"]
    assert list(out[0]) == ["method", "metric", "metric_std", "loss", "loss_std", "n"]
    assert out[0]["n"] == 3 and out[1]["n"] == 1
    assert out[0]["metric"] == pytest.approx(0.8)
    assert out[0]["metric_std"] == pytest.approx(0.1)  # sqrt((0 + 0.01 + 0.01) / 2)
    assert out[0]["loss"] == pytest.approx(3.0)
    assert out[0]["loss_std"] == pytest.approx(2.0)  # sqrt((4 + 0 + 4) / 2)
    assert out[1] == {"method": "lora", "metric": 0.5, "metric_std": 0.0, "loss": 2.0, "loss_std": 0.0, "n": 1}


def test_aggregate_runs_groups_by_several_keys_and_feeds_results_table():
    rows = [{"method": m, "task": t, "metric": v} for m, t, v in
            [("lora", "rte", 0.7), ("lora", "rte", 0.8), ("lora", "mrpc", 0.9)]]
    out = aggregate_runs(rows, group_by=("method", "task"))
    assert [(r["task"], r["n"]) for r in out] == [("rte", 2), ("mrpc", 1)]
    assert "0.7500 ± 0.0707" in results_table(out)


@pytest.mark.parametrize(
    "rows,match",
    [
        ([{"method": "lora", "metric": 0.5}, {"metric": 0.6}], r"row 1 has no 'method'; it has \['metric'\]"),
        ([{"method": "lora", "metric": "0.5"}], "row 0 has metric='0.5', which is not a number"),
    ],
)
def test_aggregate_runs_rejects_bad_rows(rows, match):
    with pytest.raises(ValueError, match=match):
        aggregate_runs(rows)


# -- atomic files -----------------------------------------------------------------------------------
def test_write_json_sorted_indented_and_creates_parents(tmp_path):
    path = write_json({"b": 1, "a": [1, 2]}, tmp_path / "run" / "results.json")
    assert path.read_text() == '{\n  "a": [\n    1,\n    2\n  ],\n  "b": 1\n}\n'


def test_write_json_encodes_numpy_torch_paths_and_plans(tmp_path):
    obj = {"x": np.float32(0.5), "n": np.int64(3), "arr": np.arange(2), "t": torch.tensor([1.5]),
           "dir": tmp_path, "plan": PLAN}
    data = json.loads(write_json(obj, tmp_path / "r.json").read_text())
    assert data["x"] == 0.5 and data["n"] == 3 and data["arr"] == [0, 1] and data["t"] == [1.5]
    assert data["dir"] == str(tmp_path)
    assert Plan(**data["plan"]) == PLAN


def test_write_json_failure_keeps_the_old_file_and_leaves_no_temp_files(tmp_path):
    path = write_json({"ok": True}, tmp_path / "results.json")
    with pytest.raises(TypeError, match="cannot encode an object of type object"):
        write_json({"ok": False, "bad": object()}, path)
    assert json.loads(path.read_text()) == {"ok": True}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_importing_loradrop_leaves_the_umask_alone():
    """report.py used to set the process's umask to 0 and back at import (a race with other threads)."""
    code = ("import os; calls = []; real = os.umask\n"
            "os.umask = lambda mask: (calls.append(mask), real(mask))[1]\n"
            "import loradrop.report, loradrop.training, loradrop.adapter_io, loradrop.cli\n"
            "from loradrop.adapter_io import atomic_write_bytes, write_json\n"
            "import tempfile; d = tempfile.mkdtemp(); write_json({}, d + '/r.json'); atomic_write_bytes(d + '/f', b'x')\n"
            "print(calls)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout
    assert not hasattr(report, "_UMASK")


def test_report_and_adapter_io_share_one_atomic_writer():
    from loradrop import adapter_io

    assert report.atomic_write_bytes is adapter_io.atomic_write_bytes and report.write_json is adapter_io.write_json


def test_atomic_write_failing_replace_keeps_the_old_file_and_leaves_no_temp_files(tmp_path, monkeypatch):
    path = atomic_write_bytes(tmp_path / "f.bin", b"old")

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(report.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(path, b"new")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_atomic_write_permissions_follow_umask_or_the_existing_file(tmp_path):
    previous = os.umask(0o027)
    try:
        path = atomic_write_bytes(tmp_path / "new.txt", b"x")
    finally:
        os.umask(previous)
    assert path.stat().st_mode & 0o777 == 0o640  # 0o666 minus the umask, not mkstemp's 0o600
    os.chmod(path, 0o640)
    atomic_write_bytes(path, b"y")
    assert path.stat().st_mode & 0o777 == 0o640 and path.read_bytes() == b"y"
