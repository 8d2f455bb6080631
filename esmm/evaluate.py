"""Stage `evaluate`: score the trained model on the held-out test days and write the metrics.

The model's own saved encoder encodes the test rows (as at serving time), so unseen ids map to
the out-of-vocabulary embedding exactly as they would in production.
"""

from __future__ import annotations

import json

from rich.table import Table

from esmm.atomic import write_text_atomic
from esmm.config import Config
from esmm.metrics import evaluate_predictions
from esmm.models import load_trained_model
from esmm.plots import write_evaluation_plots
from esmm.prepare import load_prepared_split
from esmm.train import predict

METRICS_FILE = "metrics.json"
PLOTS_FOLDER = "plots"

# What each headline metric measures: the label, the score and the impressions it covers.
METRIC_DESCRIPTIONS = {
    "cvr_auc_clicked": "CVR AUC, clicked impressions (label z, score pCVR) - the paper's",
    "ctcvr_auc": "CTCVR AUC, all impressions (label y*z, score pCTR*pCVR)",
    "ctr_auc": "CTR AUC, all impressions (label y, score pCTR)",
    "cvr_auc_all": "CVR AUC, all impressions (label y*z, score pCVR) - rechub/NISE protocol",
    "cvr_auc_entire_space": "CVR AUC, every impression vs counterfactual labels (simulated)",
    "cvr_auc_entire_space_true": "  same, expected over the true pCVR (no label noise)",
    "pcvr_bias_unclicked": "mean(pCVR - true pCVR) on unclicked impressions (simulated)",
    "pcvr_mae_unclicked": "mean |pCVR - true pCVR| on unclicked impressions (simulated)",
    "ctr_logloss": "CTR log loss",
    "ctcvr_logloss": "CTCVR log loss",
    "cvr_logloss_clicked": "CVR log loss on clicked impressions",
    "ctr_calibration": "CTR mean predicted / observed",
    "cvr_calibration_clicked": "CVR mean predicted / observed, clicked impressions",
    "ctcvr_calibration": "CTCVR mean predicted / observed",
    "cvr_ece_clicked": "CVR expected calibration error, clicked impressions",
}


def evaluate_stage(config: Config, split: str = "test", plots: bool = True) -> dict[str, float]:
    """Metrics of the trained model on ``split`` -> ``metrics.json``; with ``plots``, ROC and
    calibration curves -> ``plots/roc.png`` and ``plots/calibration.png``."""
    model, encoder, spec = load_trained_model(config.output_path / "model")
    table = load_prepared_split(config, split)
    encoded = encoder.encode_split(table)
    pctr, pcvr = predict(model, encoded.features, config.train.eval_batch_size)
    click, conversion = encoded.click.numpy(), encoded.conversion.numpy()
    metrics = evaluate_predictions(click, conversion, pctr, pcvr, encoded.true_cvr)
    report = {"model": spec, "split": split, "rows": table.num_rows, "metrics": metrics}
    write_text_atomic(config.output_path / METRICS_FILE, json.dumps(report, indent=2))
    if plots:
        title = f"({spec['kind']}, {split} split)"
        write_evaluation_plots(
            config.output_path / PLOTS_FOLDER, click, conversion, pctr, pcvr, title
        )
    return metrics


def metrics_table(metrics: dict[str, float], title: str = "Test metrics") -> Table:
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("what it measures")
    for name, description in METRIC_DESCRIPTIONS.items():
        if name in metrics:
            table.add_row(name, f"{metrics[name]:.4f}", description)
    return table
