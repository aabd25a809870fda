"""Diagnostics: *why* an efficient mechanism forgets, measured on a model.

1. capacity — recall vs facts stored, beside the cache bytes (:func:`capacity_curve`);
2. forgetting — recall vs fact-query distance (:func:`forgetting_curve`) and the memory
   horizons of linear layers' gates (:func:`log_decays`, :func:`memory_horizons`);
3. selection — whether sparse layers keep the fact's position (:func:`selection_audit`);
4. attribution — recall with one mixer ablated (:func:`layer_attribution`, :func:`ablate_mixers`).

:func:`run_diagnostics` runs those that apply and returns plain data;
:func:`diagnostics_section` turns results into plots + Markdown/HTML; ``attnlab diagnose``
does both for a checkpoint.
"""

from .attribution import layer_attribution
from .cli import add_cli
from .hooks import ablate_mixers, capture_mixer_inputs
from .memory import (
    capacity_cliff,
    capacity_curve,
    forgetting_curve,
    half_life,
    horizon_histograms,
    linear_key_dim,
    log_decays,
    memory_horizons,
    needle_depth_probe,
)
from .probes import Probe, make_probe, mqar_probe, needle_probe, predict, recall
from .run import DIAGNOSTICS, applicable, run_diagnostics
from .section import diagnostics_section, write_plots
from .selection import dsa_selected, dsa_topk_indices, selection_audit, window_selected
from .study import StudyDiagnosticsSettings, run_study_diagnostics, study_diagnostics, study_sections

__all__ = [
    "DIAGNOSTICS", "Probe", "ablate_mixers", "add_cli", "applicable", "capacity_cliff", "capacity_curve",
    "capture_mixer_inputs", "diagnostics_section", "dsa_selected", "dsa_topk_indices",
    "forgetting_curve", "half_life", "horizon_histograms", "layer_attribution", "linear_key_dim",
    "log_decays", "make_probe", "memory_horizons", "mqar_probe", "needle_depth_probe", "needle_probe",
    "predict", "recall", "run_diagnostics", "selection_audit", "window_selected", "write_plots",
    "StudyDiagnosticsSettings", "run_study_diagnostics", "study_diagnostics", "study_sections",
]  # fmt: skip
