"""`esmm compare` on a tiny table writes every listed file with one row per model."""

import pandas as pd
import pytest
from typer.testing import CliRunner

from esmm.cli import app
from esmm.compare import update_document

MODELS = [
    "base",
    "aman",
    "oversampling",
    "unbias",
    "division",
    "esmm_ns",
    "esmm",
    "escm2_ipw",
    "escm2_dr",
]


@pytest.mark.slow
def test_compare_writes_results_plots_and_the_document_block(tmp_path):
    document = tmp_path / "RESULTS.md"
    document.write_text(
        "# Results\n\n<!-- BEGIN results:tiny -->\nOLD-TABLE\n<!-- END results:tiny -->\n"
    )
    config = tmp_path / "config.yaml"
    config.write_text(f"""
output_dir: {tmp_path / "out"}
data: {{simulator: {{rows: 12000, days: 4, seed: 2}}}}
model: {{embedding_dim: 4, tower_dims: [16]}}
train: {{epochs: 1, batch_size: 512}}
compare:
  models: {MODELS}
  seeds: [0, 1]
  search: true
  aman_rates: [0.1, 0.5]
  oversampling_factors: [2, 3]
  sampling_rates: [0.5, 1.0]
""")
    result = CliRunner().invoke(
        app,
        ["compare", "-c", str(config), "-q", "--update-doc", f"{document}:tiny"],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    folder = tmp_path / "out" / "compare"
    for name in (
        "runs.csv",
        "results.csv",
        "results.md",
        "sampling.csv",
        "sampling_rate.png",
        "bars_cvr_auc_clicked.png",
        "bars_ctcvr_auc_reference_ctr.png",
        "bars_cvr_auc_entire_space.png",
    ):
        assert (folder / name).stat().st_size > 0, name
    runs = pd.read_csv(folder / "runs.csv")
    assert len(runs) == len(MODELS) * 2
    results = pd.read_csv(folder / "results.csv")
    assert results["model"].tolist() == MODELS
    assert (results["seeds"] == 2).all()
    assert results["cvr_auc_clicked_mean"].between(0, 1).all()
    # Models without their own pCTR have no own-pCTR CTCVR AUC, but all have the shared one.
    assert (
        results.set_index("model").loc["base", "ctcvr_auc_mean"]
        != results.set_index("model").loc["base", "ctcvr_auc_mean"]
    )  # NaN
    assert results["ctcvr_auc_reference_ctr_mean"].notna().all()
    assert runs.loc[runs["model"] == "aman", "parameter"].str.startswith("negative_rate=").all()
    sampling = pd.read_csv(folder / "sampling.csv")
    assert sorted(sampling["rate"].unique()) == [0.5, 1.0]
    assert len(sampling) == 2 * len(MODELS)
    markdown = (folder / "results.md").read_text()
    for label in ("BASE", "AMAN", "DIVISION", "ESMM-NS", "ESMM", "ESCM2-DR"):
        assert f"| {label} |" in markdown
    text = document.read_text()
    assert "OLD-TABLE" not in text and markdown in text
    assert f"Produced by `esmm compare -c {config}" in text


def test_update_document_refuses_a_missing_block(tmp_path):
    document = tmp_path / "doc.md"
    document.write_text("no markers here\n")
    with pytest.raises(ValueError, match="no '<!-- BEGIN results:x -->'"):
        update_document(document, "x", "table\n", "esmm compare")
