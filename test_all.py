"""The paper's claims about this code, as tests. Run: python -m pytest -q test_all.py"""
import ast
import contextlib
import csv
import copy
import dataclasses
import errno
import graphlib
import io
import json
import math
import os
import re
import shlex
import shutil
import signal
import stat
import struct
import subprocess
import sys
import types
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy.stats import mannwhitneyu
from sklearn.experimental import enable_iterative_imputer  # noqa: F401  (IterativeImputer is experimental)
from sklearn.impute import IterativeImputer
from sklearn.metrics import roc_auc_score
from torch.utils.flop_counter import FlopCounterMode

import bench
import data
import evaluate
import metrics
import models
import predict
import preprocess
import synthetic
import train_ad
import train_brain_age
import training

from metrics import classification_metrics, entropy, entropy_weighted_ensemble, regression_metrics
from layers import HyperConv, HyperLinear, init_hyperlayers
from models import (AD_MODELS, BRAIN_AGE_MODELS, AgeTarget, build_model, candidate_layers, count_parameters,
                    layer_loss_entropy)
from training import load_run
from data import UserError
from data import TabularPreprocessor
from training import RunConfig

torch.set_num_threads(2)
HERE = os.path.dirname(os.path.abspath(__file__))


# ==============================================================================================
# Index: the paper's elements -> the tests that hold them (sections below in this order)
#
# Sec. 3.1: hyperlayers (Eq. 1-2)
# Sec. 3.1 hyperlayer = per-sample layer: test_check_hyperlayers_on_the_device_equal_the_per_sample_computation,
#     test_after_a_short_run_the_two_sexes_generate_different_weights_in_every_hyperlayer
# Eq. 1-2 initialisation: test_eq1_2_generators_are_drawn_uniform_with_the_hyperfan_in_variances_and_zero_offsets,
#     test_eq1_2_measure_e_squared_on_the_rows_given_and_take_r_1_where_a_relu_follows_r_0_at_the_end_and_downsample,
#     test_hyperfusion_starts_from_the_trained_tabular_mlp_of_its_split_fold_and_version_and_eq1_2_from_its_outputs
#
# Sec. 3.1.2, App. D: hyperlayer selection
# Sec. 3.1.2 loss entropy:
#     test_loss_entropy_ranks_a_layer_the_loss_depends_on_above_one_it_ignores_over_one_range_and_a_seed_draws_alike,
#     test_loss_entropy_scores_every_layer_of_the_ad_backbone, test_select_layers_scores_every_candidate_layer,
#     test_loss_entropy_draws_each_layer_100_times_by_default_in_the_function_and_the_command,
#     test_select_layers_scores_on_a_batch_that_takes_the_classes_or_the_sexes_in_turn
#
# Sec. 3.2: the loss (Eq. 3-5) and the training loop
# Eq. 3 weight decay: test_eq3_every_trained_parameter_is_decayed_with_the_runs_lambda_and_generated_weights_are_none,
#     test_brain_age_decay_over_the_target_scale_squared_gives_the_steps_of_lambda_on_ages_in_years
# Eq. 4 regression loss (and Eq. 3's decay in its units):
#     test_brain_age_minimises_eq4_on_the_centred_age_and_gives_adam_the_runs_decay_over_the_target_scale_squared
# Eq. 5 weighted cross-entropy:
#     test_eq5_weighted_cross_entropy_is_divided_by_the_batch_size_not_by_the_sum_of_the_targets_weights,
#     test_the_loop_steps_on_eq5_gradients_alone_in_training_mode_and_keeps_the_epoch_best_on_validation_rows
# the loop: steps, the kept epoch (Sec. 4.2.2, 4.3.6):
#     test_best_pt_holds_the_first_epoch_with_the_best_validation_score_and_last_pt_the_last,
#     test_the_training_scripts_test_with_the_best_epochs_checkpoint_not_the_last,
#     test_versions_are_independent_initialisations_and_one_version_twice_starts_from_the_same_weights,
#     test_a_run_writes_its_checkpoints_log_predictions_and_metrics_with_one_log_row_an_epoch
# also: test_fit_runs_forward_and_loss_in_one_autocast_at_the_runs_precision_and_scales_float16s_loss,
#     test_one_ddp_step_on_two_processes_takes_the_mean_of_their_shares_gradients,
#     test_resume_after_an_interruption_ends_as_an_uninterrupted_run_from_the_saved_adam_moments
#
# Sec. 3.3, 4.3.3: tabular attributes and missing values
# Sec. 3.3 imputation and indicators:
#     test_censored_csf_values_read_as_the_assay_limit_and_no_other_value_is_read_censored,
#     test_imputation_is_fitted_on_training_rows_only_and_its_state_round_trips_exactly,
#     test_missing_indicators_are_for_the_attributes_with_empty_cells_in_the_training_rows_alone_and_no_nan_remains,
#     test_imputation_replays_scikit_learns_iterative_imputer,
#     test_a_training_run_fits_its_z_scores_imputation_and_missing_indicators_on_its_training_rows_only,
#     test_empty_age_sex_education_and_apoe4_cells_are_imputed_and_the_split_does_not_depend_on_them,
#     test_a_column_constant_over_the_training_rows_is_z_scored_about_its_value_not_read_as_missing,
#     test_na_cells_of_an_r_export_read_as_empty_ones
# sex (Sec. 3.3, 4.2):
#     test_the_sex_one_hot_is_male_then_female_in_both_tasks_so_a_saved_run_reads_each_sex_as_it_was_trained,
#     test_an_imputed_sex_is_a_probability_its_two_columns_in_0_1_summing_to_1_however_far_its_neighbours_lie,
#     test_training_rows_without_an_empty_cell_read_a_new_patients_empty_cells_as_their_means_sex_too
# also: test_a_prediction_depends_on_its_own_row_only_and_empty_cells_or_absent_columns_use_the_runs_saved_imputation,
#     test_a_column_empty_for_every_training_subject_is_read_as_missing_at_prediction_and_said
#
# Sec. 3.4: ensembles and metrics (Eq. 6-10)
# Eq. 6-8 ensembles: test_eq7_8_weight_each_member_by_its_inverse_entropy_sample_by_sample_and_eq6_takes_the_mean,
#     test_a_run_named_twice_is_one_member_and_a_runs_metrics_file_is_not_called_a_corrupt_checkpoint
# Eq. 9-10 and the other metrics: test_metrics_against_a_hand_made_confusion_matrix_and_maes_by_hand,
#     test_eq9_averages_the_recalls_of_the_classes_present_when_a_class_has_no_subjects,
#     test_the_auc_is_the_macro_mean_of_the_one_vs_rest_aucs_not_weighted_micro_nor_one_vs_one,
#     test_the_nll_reads_probabilities_off_one_by_float32s_rounding_as_probabilities_without_a_warning
# also: test_eq7_8_each_row_of_the_ad_table_ensembles_its_folds_sample_by_sample,
#     test_brain_age_ensembles_the_five_versions_with_the_lowest_validation_mae,
#     test_predict_combines_the_members_by_eq7_8_each_reproducing_its_test_predictions_and_writes_their_spread,
#     test_predict_reads_each_brain_age_member_with_its_own_target_and_corrects_the_eq6_means_gap_by_the_mean_fit,
#     test_calibrated_prediction_keeps_every_members_class_and_changes_the_ensemble_only_through_eq8_weights
#
# Sec. 3.5, Tables 5-6, Fig. 2-3: the networks
# Tables 5-6, Fig. 2-3: test_parameter_counts_equal_tables_5_and_6,
#     test_tables_5_6_each_network_computes_its_layers_in_the_papers_order_with_its_dropout_rates_and_bn_momenta,
#     test_in_eval_mode_a_batch_equals_its_samples_one_at_a_time,
#     test_app_b_every_ad_network_of_cn_vs_ad_ends_in_two_outputs
#
# Sec. 4.2: brain age, Fig. 4
# Sec. 4.2.3 split:
#     test_brain_age_split_cuts_every_sex_and_age_stratum_80_10_10_by_its_seed_and_the_demo_keeps_200_and_200,
#     test_a_brain_age_cohort_too_small_for_its_split_is_refused_in_one_line_before_anything_is_written
# Sec. 4.2.2 training and testing:
#     test_a_run_writes_its_checkpoints_log_predictions_and_metrics_with_one_log_row_an_epoch,
#     test_the_brain_age_target_is_centred_on_the_mean_age_of_the_training_rows_it_trains_on,
#     test_real_data_trains_on_table_1s_schedule_and_an_option_overrides_one_number_of_it,
#     test_the_brain_age_demo_anneals_its_learning_rate_by_a_cosine_and_real_data_keeps_table_1s_constant_rate,
#     test_precise_bn_re_estimates_the_running_statistics_from_the_training_batches_alone,
#     test_brain_age_training_re_estimates_batch_norm_before_every_validation_from_its_chosen_training_rows_in_order,
#     test_the_age_bias_correction_leaves_a_gap_uncorrelated_with_age_on_its_fitting_set,
#     test_the_age_bias_of_the_brain_age_gap_is_fitted_on_the_validation_rows_never_the_test_rows,
#     test_brain_age_ensembles_the_five_versions_with_the_lowest_validation_mae,
#     test_brain_age_versions_whose_validation_subjects_differ_are_refused_in_one_line,
#     test_predict_reads_each_brain_age_member_with_its_own_target_and_corrects_the_eq6_means_gap_by_the_mean_fit,
#     test_the_brain_age_network_gives_the_age_in_float32_under_bfloat16,
#     test_brain_age_scans_at_another_scanners_intensity_scale_are_read_as_their_z_scores_in_training_and_prediction
# Fig. 4A training sets, Sec. 4.2.5's 2->2 embedding, Fig. 4 sweep and plots:
#     test_fig4a_training_sets_are_one_size_min_men_women_drawn_with_the_seed_and_the_mix_is_half_and_half,
#     test_fig4a_training_sets_are_drawn_from_the_training_split_alone,
#     test_embedding_dim_2_trains_the_two_to_two_sex_embedding_of_the_ablation_in_its_own_folder,
#     test_brain_age_sweep_reads_every_test_scan_as_male_and_as_female_and_an_absent_sex_has_no_mean,
#     test_brain_age_plots_draw_the_scatters_fig4a_and_fig4b_or_say_which_is_skipped
# the synthetic brain-age cohort:
#     test_in_the_brain_age_cohort_mens_brains_age_faster_so_reading_the_image_without_sex_leaves_years_behind,
#     test_the_oracle_report_names_both_oracles_and_the_run_on_its_test_subjects,
#     test_synthetic_brain_age_cohort_loads_back
#
# Sec. 4.3: AD classification, Table 3
# Sec. 4.3.4, App. C.1 split:
#     test_the_ad_split_is_five_subsets_by_its_seed_subset_4_tests_every_fold_and_subset_k_validates_fold_k,
#     test_each_ad_subset_keeps_the_diagnosis_and_sex_proportions_and_every_sex_diagnosis_20_age_bin_stratum
# Sec. 3.5.2, 4.3.6 hippocampus crops:
#     test_mirrored_crop_is_the_flip_of_the_right_box_each_box_z_scored_over_its_non_zero_voxels,
#     test_dataset_items_have_one_side_in_training_and_both_in_evaluation,
#     test_each_epoch_draws_its_hippocampus_sides_from_its_own_seed_with_loader_workers_as_a_resumed_run_does,
#     test_validation_and_test_average_the_soft_predictions_of_both_hippocampi,
#     test_synthetic_ad_anatomy_depends_on_diagnosis_age_and_sex_and_its_boxes_mirror_each_other
# Table 3 and its runs: test_ad_table_has_a_row_per_seed_and_version_with_mean_std_and_mann_whitney,
#     test_eq7_8_each_row_of_the_ad_table_ensembles_its_folds_sample_by_sample,
#     test_folds_whose_configs_images_or_test_subjects_differ_are_refused_and_the_cli_says_so_in_one_line,
#     test_folds_ensemble_though_their_training_rows_gave_them_other_missing_indicators,
#     test_late_fusion_of_imaging_and_tabular_runs_of_other_test_subjects_is_refused,
#     test_a_run_copied_into_another_runs_folder_is_refused_by_the_tables_that_name_runs_by_their_folders,
#     test_ad_plots_draw_each_rows_confusion_roc_and_reliability_and_table3_at_their_size,
#     test_ad_sweep_changes_the_tabular_attribute_of_every_test_row,
#     test_sweep_plots_draw_how_the_prediction_moves_with_the_attribute,
#     test_the_runner_skips_finished_runs_resumes_interrupted_ones_and_trains_the_rest,
#     test_print_commands_gives_one_command_per_missing_run_tabular_first_and_trains_nothing,
#     test_run_protocol_with_two_jobs_trains_each_missing_run_once_and_prints_the_serial_table,
#     test_with_jobs_each_hyperfusion_run_waits_for_the_tabular_mlp_of_its_split_seed_version_and_fold,
#     test_a_failing_run_of_the_protocol_stops_it_in_one_line_its_dependents_never_start_and_the_others_finish,
#     test_the_runners_time_left_counts_what_the_runs_still_running_have_run,
#     test_table3_reports_the_calibration_of_every_ensemble_after_the_papers_columns
#
# App. A-C: preprocessing, oversampling
# App. A.1 preprocessing:
#     test_preprocess_centres_its_box_on_the_brain_masks_centre_of_mass_and_z_scores_the_brain_voxels_alone,
#     test_preprocess_gives_a_centred_zscored_90x120x99_volume_at_1_75mm,
#     test_preprocess_resamples_trilinearly_so_a_ramp_reads_as_the_ramp_between_the_input_voxels,
#     test_preprocess_reads_a_mask_of_0_and_255_as_the_same_brain_as_one_of_0_and_1,
#     test_preprocess_reads_a_brain_whose_white_matter_is_most_of_its_voxels_at_one_value,
#     test_preprocess_refuses_to_estimate_the_mask_of_an_image_normalised_already_and_takes_its_given_mask,
#     test_an_estimated_brain_mask_is_the_largest_bright_component_with_the_dark_ventricles_inside_it,
#     test_fuzzy_cmeans_finds_three_tissue_classes, test_preprocess_batch_mode_writes_every_subject_and_names_a_bad_row,
#     test_preprocess_batch_mode_reads_each_subjects_mask_from_its_column_and_leaves_the_column_out,
#     test_preprocess_n4_without_simpleitk_says_so
# App. C.4 oversampling: test_app_c4_oversampling_draws_every_class_equally_often_in_a_run_folder_apart_from_eq5s
#
# The program's own behaviour follows in sections of its own, each opening with its claims: real data in; bad
# input; faults and resume; predict.py; calibration; many processes, devices, precision; command lines, progress.
# ==============================================================================================


# ----------------------------------------------------------------------------------------------
# Shared fixtures and helpers (used by more than one section)


# small inputs for CPU: brain age needs >= 36 voxels a side for its three conv blocks
BRAIN_AGE_SMALL = (36, 38, 36)
AD_SMALL = (16, 24, 16)
COLUMNS = ["PTGENDER_Male", "PTGENDER_Female"] + list(data.AD_CONTINUOUS)
NAMES = ["CN", "MCI", "AD"]
SCHEDULE = dict(epochs=2, batch_size=8, lr=1e-3, weight_decay=1e-5)


# one synthetic cohort per size, generated once per pytest run
@pytest.fixture(scope="session")
def ad_cohort40(tmp_path_factory):
    return synthetic.make_synthetic_ad(tmp_path_factory.mktemp("ad40") / "cohort", n=40, seed=3)


@pytest.fixture(scope="session")
def ad_cohort60(tmp_path_factory):
    """60 subjects whose crops.json holds AD_SMALL boxes around the same hippocampi: image runs a third the cost."""
    csv_path = synthetic.make_synthetic_ad(tmp_path_factory.mktemp("ad60"), n=60, seed=0)
    crops = synthetic.synthetic_crops(synthetic.AD_SYNTH["shape"], AD_SMALL)
    crops.save(os.path.join(os.path.dirname(csv_path), "crops.json"))
    return csv_path


@pytest.fixture(scope="session")
def brain_age_cohort20(tmp_path_factory):
    return synthetic.make_synthetic_brain_age(tmp_path_factory.mktemp("ba20") / "cohort", n=20, seed=4)


@pytest.fixture(scope="session")
def brain_age_cohort40(tmp_path_factory):
    return synthetic.make_synthetic_brain_age(tmp_path_factory.mktemp("ba40"), n=40, seed=0)


def tiny_ad(folder, n=3, group="CN", age="70.5"):
    """A 3-subject AD table with tiny 8x8x8 images; returns the CSV path."""
    os.makedirs(folder / "images", exist_ok=True)
    rows = ["Subject,Group,AGE,PTGENDER,PTEDUCAT,APOE4,ABETA,PTAU,TAU,FDG,AV45"]
    for i in range(n):
        data.save_nifti(np.random.default_rng(i).random((8, 8, 8)).astype(np.float32), 2.0,
                        folder / "images" / f"S{i}.nii.gz")
        rows.append(f"S{i},{group if i == 1 else 'AD'},{age if i == 1 else '71'},Female,16,1,>1700,<8,300,,1.2")
    (folder / "ad.csv").write_text("\n".join(rows) + "\n")
    return folder / "ad.csv"


def assert_clean_error(proc, *names):
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error:") and "Traceback" not in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    for n in names:
        assert str(n) in proc.stderr, (n, proc.stderr)


def no_temp_files(folder):
    return not any(".tmp-" in f for f in os.listdir(folder))


def _randomise(module, seed=0):
    """Random values in every parameter, so no test passes by a lucky zero or a constant."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return module


def _ad_args(csv_path, out, *extra):
    return ["--data-csv", str(csv_path), "--out", str(out), "--epochs", "2", "--batch-size", "8", "--quiet",
            "--split-seed", "0", "--fold", "1", "--precision", "fp32", *extra]


def _run_dir(out, model, fold=1):
    return training.ad_run_dir(out, model, 0, 0, fold)


def save_run_checkpoint(run_dir, run, inputs, model=None, **state):
    """A best.pt as the training scripts write it (untrained or empty weights), for evaluation tests."""
    os.makedirs(run_dir, exist_ok=True)
    training.save_checkpoint({"model": model.state_dict() if model is not None else {}, "epoch": 0, "best": {},
                              "run": dataclasses.asdict(run), "inputs": inputs, **state},
                             os.path.join(run_dir, "best.pt"))


def fake_ad_run(runs, model, seed, version, fold, probs, labels, subjects=None, **config):
    """The files train_ad.py writes, with made-up test probabilities; `config` overrides run options or inputs."""
    run_dir = training.ad_run_dir(runs, model, seed, version, fold)
    fields = {f.name for f in dataclasses.fields(RunConfig)}
    run = RunConfig(task="ad", model=model, version=version, split_seed=seed, fold=fold, classes=3, loss="wce",
                    data_csv="ad.csv", **SCHEDULE).replace(**{k: v for k, v in config.items() if k in fields})
    inputs = {"n_tabular": len(COLUMNS), "tabular_columns": COLUMNS, "class_names": NAMES, "crops": None,
              **{k: v for k, v in config.items() if k not in fields}}
    save_run_checkpoint(run_dir, run, inputs)
    subjects = subjects if subjects is not None else [f"S{seed}-{i}" for i in range(len(labels))]
    np.savez(os.path.join(run_dir, "predictions.npz"), subjects=np.array(subjects), labels=np.asarray(labels),
             probs=np.asarray(probs))
    with open(os.path.join(run_dir, "metrics.json"), "w") as f:
        json.dump({"val": {}, "test": classification_metrics(labels, probs, inputs["class_names"]), "best_epoch": 0}, f)
    return run_dir


def random_probs(rng, n, c=3, sharp=2.0):
    p = np.exp(rng.normal(0, sharp, (n, c)))
    return p / p.sum(1, keepdims=True)


def fake_brain_age_run(runs, version, val_mae, pred, age, sex, model="hyperfusion", train_sex="all", val=None,
                       names="BV"):
    """The files train_brain_age.py writes, with made-up test (and, given `val` = (age, pred), validation) ages;
    the test and validation subjects named by names[0] and names[1] and a number."""
    run_dir = training.brain_age_run_dir(runs, model, version, train_sex=train_sex)
    run = RunConfig(task="brain-age", model=model, version=version, split_seed=0, embedding_dim=1,
                    train_sex=train_sex, data_csv="brain_age.csv", **SCHEDULE)
    save_run_checkpoint(run_dir, run, {"n_tabular": 2, "image_shape": [36, 38, 36]},
                        target={"centre": 50.0, "scale": 10.0})
    extra = {} if val is None else dict(val_subjects=np.array([f"{names[1]}{i}" for i in range(len(val[0]))]),
                                        val_age=np.asarray(val[0], np.float32), val_pred=np.asarray(val[1], np.float32))
    np.savez(os.path.join(run_dir, "predictions.npz"), subjects=np.array([f"{names[0]}{i}" for i in range(len(age))]),
             age=np.asarray(age, np.float32), sex=np.asarray(sex), pred=np.asarray(pred, np.float32), **extra)
    with open(os.path.join(run_dir, "metrics.json"), "w") as f:
        json.dump({"val": {"mae": val_mae}, "test": regression_metrics(age, pred, sex), "best_epoch": 0}, f)
    return run_dir


class _Stop(Exception):
    """Raised by a spy to end a training script at the point a test has seen."""


def _strata(*keys):
    """One group id per subject from its stratification keys."""
    return np.unique(np.stack(keys, 1), axis=0, return_inverse=True)[1].ravel()


def _age_bins(age, n_bins=20):
    """Equal-width age bins over the known ages, computed here on their own; an unknown age is bin -1."""
    known = np.isfinite(age)
    edges = np.linspace(np.nanmin(age), np.nanmax(age), n_bins + 1)
    inside = np.clip(np.searchsorted(edges, np.where(known, age, edges[0]), side="right") - 1, 0, n_bins - 1)
    return np.where(known, inside, -1)


ADNIMERGE = """RID,PTID,VISCODE,EXAMDATE,DX_bl,DX,AGE,PTGENDER,PTEDUCAT,APOE4,ABETA,PTAU,TAU,FDG,AV45,Years_bl,MMSE
1,011_S_0001,bl,2005-09-08,CN,CN,74.3,Male,16,0,>1700,20.1,230,6.5,,0,29
1,011_S_0001,m12,2006-09-12,CN,MCI,74.3,Male,16,0,,,,6.1,,1.0,27
2,011_S_0002,m06,2006-03-01,AD,Dementia,80.1,Female,12,1,,,,,,0.5,20
3,011_S_0003,bl,2005-11-08,SMC,CN,70.0,Female,18,0,900,,,,1.1,0,30
3,011_S_0003,m06,2006-05-02,SMC,CN,70.0,Female,18,0,,,,,,0.5,30
4,011_S_0004,bl,2005-11-10,LMCI,MCI,,Male,,1,640,31,330,,,0,26
5,011_S_0005,bl,2005-12-01,AD,Dementia,77.7,Female,14,2,<200,55,520,5.2,1.5,0,21
5,011_S_0005,bl,2005-12-01,AD,Dementia,77.7,Female,14,2,,,,,,0,21
"""


def _png_header(path):
    """(width, height, colour type) of a PNG whose signature, chunk CRCs, final IEND and IDAT rows (8-bit RGB:
    the standard-library writer, or RGBA: matplotlib's, one filter byte a row) all check out."""
    blob = open(path, "rb").read()
    assert blob[:8] == b"\x89PNG\r\n\x1a\n" and blob[12:16] == b"IHDR"
    w, h, depth, colour = struct.unpack(">IIBB", blob[16:26])
    pos, kinds, idat = 8, [], b""
    while pos < len(blob):
        n, kind = struct.unpack(">I4s", blob[pos:pos + 8])
        body = blob[pos + 8:pos + 8 + n]
        assert struct.unpack(">I", blob[pos + 8 + n:pos + 12 + n])[0] == zlib.crc32(kind + body) & 0xFFFFFFFF
        kinds.append(kind)
        idat += body if kind == b"IDAT" else b""
        pos += 12 + n
    assert kinds[-1] == b"IEND" and depth == 8 and colour in (2, 6), (kinds[-1], depth, colour)
    assert len(zlib.decompress(idat)) == h * (1 + (3 if colour == 2 else 4) * w)
    return w, h, colour


def _png_size(path):
    return _png_header(path)[:2]


class _Initialised(Exception):
    """Raised by _initial_weights' spy once the training script hands its initialised model to fit."""


def _initial_weights(script, argv, monkeypatch, pretrained=()):
    """The state dict a training script's model holds as it calls training.fit (after Eq. 1-2 and the tabular
    embedding's loading); the run stops there. Models of the `pretrained` classes train as usual."""
    seen, real = [], script.fit

    def spy(model, *args, **kwargs):
        if isinstance(model, pretrained):
            return real(model, *args, **kwargs)
        seen.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        raise _Initialised

    monkeypatch.setattr(script, "fit", spy)
    with pytest.raises(_Initialised):
        script.main(argv)
    return seen[0]


@pytest.fixture(scope="session")
def brain_age_run(brain_age_cohort40, tmp_path_factory):
    """A two-epoch HyperFusion brain-age run on the 40-subject cohort -> (its metrics, its folder)."""
    out = tmp_path_factory.mktemp("brain_age_run")
    metrics = train_brain_age.main(["--data-csv", str(brain_age_cohort40), "--out", str(out), "--epochs", "2",
                                    "--batch-size", "8", "--quiet", "--precision", "fp32"])
    return metrics, training.brain_age_run_dir(out, "hyperfusion", 0)


@pytest.fixture(scope="module")
def fig4a_women_run(brain_age_cohort20, tmp_path_factory):
    """A one-epoch imaging run trained on women only (Fig. 4A), split 50/25/25 -> (table, (train, val, test),
    (what select_training_sex was given, the ages each precise BN read), the run folder)."""
    out, given, calibrated = tmp_path_factory.mktemp("fig4a_women"), [], []
    real = train_brain_age.select_training_sex

    def spy(train_idx, sex, which, seed):
        given.append(np.array(train_idx))
        return real(train_idx, sex, which, seed)

    def precise_bn_spy(model, loader, device, precision):
        calibrated.append(torch.cat([age for _, _, age in loader]).numpy())
        return training.recalibrate_batchnorm(model, loader, device, precision)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_brain_age, "select_training_sex", spy)
        mp.setattr(train_brain_age, "recalibrate_batchnorm", precise_bn_spy)
        train_brain_age.main(["--data-csv", str(brain_age_cohort20), "--out", str(out), "--epochs", "1",
                              "--batch-size", "4", "--model", "imaging", "--train-sex", "F", "--split", "0.5", "0.25",
                              "0.25", "--quiet", "--precision", "fp32"])
    table = data.read_brain_age_table(str(brain_age_cohort20), None)
    parts = data.brain_age_split(table.age, table.sex, 0, (0.5, 0.25, 0.25))
    return table, parts, (given, calibrated), training.brain_age_run_dir(out, "imaging", 0, train_sex="F")


def _tabular_args(csv_path, out, *extra):
    """train_ad.py options of the cheapest AD run that trains (the tabular MLP: well under a second an epoch)."""
    return _ad_args(csv_path, out, "--model", "tabular", *extra)


class _TabularNet(nn.Module):
    """The smallest network fit() trains: a linear layer on the tabular vector, the image ignored."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 2)

    def forward(self, image, tabular):
        return self.linear(tabular)


def _scripted_fit(folder, scores, lower_is_better, version=0, sampler=None):
    """training.fit on a tiny net whose validation scores are `scores`, one per epoch -> (best, weights per epoch);
    sampler: items -> the loader's sampler."""
    torch.manual_seed(0)
    items = torch.utils.data.TensorDataset(torch.zeros(8, 0), torch.randn(8, 3), torch.randint(0, 2, (8,)))
    run = RunConfig(task="ad", model="tabular", version=version, split_seed=0, fold=0, classes=2, loss="ce",
                    data_csv="x", epochs=len(scores), batch_size=4, lr=0.1, weight_decay=0.0)
    weights, left = [], list(scores)

    def validate(model):
        weights.append({k: v.clone() for k, v in model.state_dict().items()})
        return {"score": left.pop(0)}

    loader = torch.utils.data.DataLoader(items, batch_size=4, sampler=sampler and sampler(items))
    best = training.fit(_TabularNet(), loader, F.cross_entropy, validate,
                        "score", run, str(folder), {}, quiet=True, lower_is_better=lower_is_better)
    return best, weights


def _eq7_8_by_hand(probs):
    """Eq. 7-8 member by member, sample by sample: H_k = -sum_c p_c log p_c, alpha_k = (1/H_k) / sum_j (1/H_j),
    p = sum_k alpha_k p_k. probs (K, B, C) -> (B, C)."""
    probs = np.asarray(probs, np.float64)
    out = np.zeros(probs.shape[1:])
    for b in range(probs.shape[1]):
        h = [-sum(p * math.log(p) for p in member[b] if p > 0) for member in probs]
        alpha = [(1 / h_k) / sum(1 / h_j for h_j in h) for h_k in h]
        out[b] = sum(a * member[b] for a, member in zip(alpha, probs))
    return out


GROUPS = [(0, 0), (0, 1), (1, 0)]


@pytest.fixture
def ad_runs(tmp_path):
    """imaging, tabular and hyperfusion runs for three (seed, version) groups of four folds; an incomplete daft
    group. -> (runs dir, {(model, seed, version): fold probs (4, N, C)}, labels per seed)."""
    rng = np.random.default_rng(0)
    labels = {s: rng.integers(0, 3, 20) for s in (0, 1)}
    made = {}
    for model, skill in [("imaging", 0.5), ("tabular", 1.0), ("hyperfusion", 3.0)]:
        for seed, version in GROUPS:
            folds = []
            for fold in range(4):
                p = random_probs(rng, 20) + skill * np.eye(3)[labels[seed]]
                p /= p.sum(1, keepdims=True)
                fake_ad_run(tmp_path, model, seed, version, fold, p, labels[seed])
                folds.append(p)
            made[(model, seed, version)] = np.stack(folds)
    for fold in range(3):  # fold 3 never finished
        fake_ad_run(tmp_path, "daft", 0, 0, fold, random_probs(rng, 20), labels[0])
    return tmp_path, made, labels


def run_main(main, *args):
    """A script's main through data.run_cli in this process, as its __main__ runs it -> returncode, stdout, stderr."""
    out, err, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            data.run_cli(main, [str(a) for a in args])
        except SystemExit as exc:
            code = exc.code
    return types.SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


def _edit_table(src, dst, edit):
    """Copy a CSV applying edit(line number, cells) -> cells to every data line (line 1 is the header)."""
    lines = open(src).read().splitlines()
    out = [lines[0]] + [",".join(edit(k, line.split(","))) for k, line in enumerate(lines[1:], start=2)]
    with open(dst, "w") as f:
        f.write("\n".join(out) + "\n")
    return dst


def _files(folder):
    return sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs)


@pytest.fixture(scope="session")
def ad_fold_runs(ad_cohort60, tmp_path_factory):
    """Folds 0 and 1 of HyperFusion, split seed 0, version 0, one epoch each (with their tabular MLPs)."""
    out = tmp_path_factory.mktemp("fold_runs")
    for fold in (0, 1):
        train_ad.main(["--data-csv", str(ad_cohort60), "--out", str(out), "--epochs", "1", "--batch-size", "8",
                       "--quiet", "--split-seed", "0", "--fold", str(fold), "--precision", "fp32"])
    return out


def _predict(*args):
    return predict.main([*map(str, args), "--quiet"])


def _pixels(size):
    return tuple(int(round(v * evaluate.DPI)) for v in size)


def _spy_on_figures(monkeypatch):
    """{file name: the figure's texts (titles, legends, annotations)} and {file name: its Figure}, as each is saved."""
    texts, figures, save = {}, {}, evaluate.Figures.save

    def spy(self, fig, name):
        found = [fig.get_suptitle()]
        for ax in fig.axes:
            legend = ax.get_legend()
            found += [ax.get_title(), ax.get_xlabel()] + [t.get_text() for t in ax.texts] \
                + ([t.get_text() for t in legend.get_texts()] if legend else [])
        texts[name], figures[name] = found, fig
        return save(self, fig, name)

    monkeypatch.setattr(evaluate.Figures, "save", spy)
    return texts, figures


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICES = [pytest.param("cpu", id="device-cpu"), pytest.param("cuda", id="device-cuda", marks=cuda)]


# ----------------------------------------------------------------------------------------------
# Sec. 3.1: hyperlayers (Eq. 1-2)
# A hyperlayer equals the per-sample computation with W = G_w e + c_w; Eq. 1-2 initialise the generators from E[e^2]
# measured on the training rows.


# (dim, kernel, stride, padding) of a HyperConv, or (0, k, 1, 0): a HyperLinear with an embedding of size k
CONV_SHAPES = [(1, 1, 0), (1, 2, 0), (3, 1, 1), (3, 2, 1), (3, 1, 0), (3, 2, 0), (1, 1, 1)]
HYPERLAYER_CASES = [(0, 1, 1, 0), (0, 3, 1, 0)] + [(dim, *shape) for dim in (1, 2, 3) for shape in CONV_SHAPES]


def _ad_parts(table, fold=1):
    """(train, val, test) rows of an AD table's fold under split seed 0."""
    return data.ad_fold(data.ad_split(table.sex, table.labels, table.age, 0), fold)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["factorised", "materialised"])
def test_check_hyperlayers_on_the_device_equal_the_per_sample_computation(device, mode):
    """HyperLinear (dim 0) and 1-3D HyperConv, offsets c not zero (as once trained); gradients reach e, G_w and G_b."""
    for dim, k, stride, padding in HYPERLAYER_CASES:
        torch.manual_seed(dim * 100 + k * 10 + stride)
        if dim == 0:
            layer = HyperLinear(37, 11, nn.Sequential(nn.Linear(5, k), nn.Tanh()), k, mode=mode)
            x, functional, kwargs = torch.randn(6, 37), F.linear, {}
        else:
            layer = HyperConv(dim, 4, 6, k, stride, padding, nn.Linear(5, 2), 2, mode=mode)
            x, functional = torch.randn(6, 4, *[9, 8, 7][:dim]), (F.conv1d, F.conv2d, F.conv3d)[dim - 1]
            kwargs = dict(stride=stride, padding=padding)
        layer, x, tabular = _randomise(layer).to(device), x.to(device), torch.randn(6, 5, device=device)
        h = layer.hypernet
        assert (h.weights_gen.bias != 0).all() and (h.bias_gen.bias != 0).all()
        with torch.no_grad(), torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=False,
                                                         allow_tf32=False):                     # float32 on a GPU
            e, cpu = h.embedding(tabular), device == "cpu"
            w, b = h.generate(e)
            by_hand = dict(rtol=1e-6, atol=1e-6) if cpu else dict(rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(w, e @ h.weights_gen.weight.T + h.weights_gen.bias, **by_hand)
            torch.testing.assert_close(b, e @ h.bias_gen.weight.T + h.bias_gen.bias, **by_hand)
            naive = bench.naive_hyperlayer(layer, x, tabular, functional, **kwargs)     # the benchmark's baseline
            torch.testing.assert_close(layer(x, tabular), naive, rtol=1e-5 if cpu else 1e-4, atol=1e-5,
                                       msg=str((dim, k, stride, padding)))
        layer(x, tabular).square().sum().backward()
        for p in [*h.embedding.parameters(), h.weights_gen.weight, h.bias_gen.weight]:
            assert p.grad is not None and p.grad.abs().sum() > 0


@pytest.mark.parametrize("d_k", [1, 3])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("relu_follows", [False, True])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_eq1_2_generators_are_drawn_uniform_with_the_hyperfan_in_variances_and_zero_offsets(kind, relu_follows,
                                                                                             bias, d_k):
    """V_w = 2^r / (2^s d_j d_k E[e^2]), V_b = 2^r / (2 d_k E[e^2]), c = 0: a unit-variance input keeps its variance."""
    torch.manual_seed(10 * d_k + 4 * bias + 2 * relu_follows + (kind == "conv"))
    embedding, options = nn.Linear(4, d_k), dict(bias=bias, relu_follows=relu_follows)
    layer, d_j = (HyperLinear(7, 5000, embedding, d_k, **options), 7) if kind == "linear" else \
        (HyperConv(2, 5, 4000, 3, embedding=embedding, embedding_dim=d_k, **options), 5 * 3 * 3)
    _randomise(layer, seed=d_k)
    rows = torch.randn(300, 4)
    with torch.no_grad():
        embedding.weight.mul_(3 / embedding.weight.norm(dim=1, keepdim=True))   # each e_k of sd 3 and mean 2
        embedding.bias.fill_(2.0)
        sq_mean, var = float(embedding(rows).pow(2).mean()), float(embedding(rows).var())
    assert sq_mean > 4 and sq_mean > 1.2 * var                      # E[e^2] ~13: neither 1 nor the variance 9
    init_hyperlayers(layer, rows)
    r, s, h = int(relu_follows), int(bias), layer.hypernet
    variances = {"weights_gen": 2 ** r / (2 ** s * d_j * d_k * sq_mean)}                  # Eq. 1
    if bias:
        variances["bias_gen"] = 2 ** r / (2 * d_k * sq_mean)                              # Eq. 2
    assert bias or h.bias_gen is None
    for name, var in variances.items():
        g, bound = getattr(h, name).weight.detach(), math.sqrt(3 * var)      # U(+-bound): max within 3% of it
        assert g.numel() >= 4000 and 0.97 * bound < float(g.abs().max()) <= bound * (1 + 1e-6), (name, bound)
        assert float(g.pow(2).mean()) == pytest.approx(var, rel=4 * 0.894 / math.sqrt(g.numel())), name  # 4 s.e.
        assert not getattr(h, name).bias.any(), name                                      # c = 0
    if kind == "linear":
        x = torch.randn(300, 7)
        with torch.no_grad():
            y = layer(x, rows)
        ratio = float(F.relu(y).pow(2).mean() if relu_follows else y.var()) / float(x.var())   # He et al.'s sense
        assert 0.9 <= ratio <= 1.1, ratio


def test_eq1_2_measure_e_squared_on_the_rows_given_and_take_r_1_where_a_relu_follows_r_0_at_the_end_and_downsample():
    """Fig. 2-3: a ReLU follows linear1-3 (r = 1), not the final layer nor the AD downsample (BN does: r = 0)."""
    model = build_model("brain-age", "hyperfusion", image_shape=BRAIN_AGE_SMALL)
    sex = torch.eye(2)[torch.randint(0, 2, (50,))]
    measured = init_hyperlayers(model, sex)
    assert set(measured) == {"linear1", "linear2", "linear3", "final_layer"}
    for name, sq_mean in measured.items():
        layer = getattr(model, name)
        with torch.no_grad():
            assert sq_mean == pytest.approx(float(layer.hypernet.embedding(sex).pow(2).mean()), rel=1e-5)
        bound = (2 ** (name != "final_layer") / (2 * layer.fan_in * 1 * sq_mean) * 3) ** 0.5  # a wrong r: x sqrt(2)
        assert 0.9 * bound < float(layer.hypernet.weights_gen.weight.detach().abs().max()) <= bound, name
    downsample = build_model("ad", "hyperfusion", n_tabular=15).block4.downsample
    assert not downsample.relu_follows and downsample.fan_in == 128                 # then Eq. 1-2 with r = 0


def test_hyperfusion_starts_from_the_trained_tabular_mlp_of_its_split_fold_and_version_and_eq1_2_from_its_outputs(
        ad_cohort60, tmp_path, monkeypatch):
    """Sec. 3.1.3, 4.3.6: the MLP's weights and BN statistics; E[e^2] of its embedding on the training rows."""
    seen, real = [], train_ad.init_hyperlayers
    spy = lambda model, rows: seen.append(rows.clone()) or real(model, rows)
    monkeypatch.setattr(train_ad, "init_hyperlayers", spy)
    start = _initial_weights(train_ad, _ad_args(ad_cohort60, tmp_path, "--version", "2", "--epochs", "1"),
                             monkeypatch, pretrained=models.TabularMLP)
    mlp = load_run(training.ad_run_dir(tmp_path, "tabular", 0, 2, 1))
    assert (mlp.run.split_seed, mlp.run.fold, mlp.run.version) == (0, 1, 2)
    prefix, trained = "block4.downsample.hypernet.embedding.", mlp.model().embedding.state_dict()
    assert {k[len(prefix):] for k in start if k.startswith(prefix)} == set(trained)
    assert all(torch.equal(start[prefix + k], v) for k, v in trained.items())
    table = data.read_ad_table(str(ad_cohort60))
    rows = torch.as_tensor(mlp.tabular.transform([table.raw[i] for i in _ad_parts(table)[0]]))
    assert len(seen) == 1 and torch.equal(seen[0].cpu(), rows)
    with torch.no_grad():
        sq_mean = float(copy.deepcopy(mlp.model().embedding).train()(rows).pow(2).mean())   # train-mode BN
    assert abs(sq_mean - 1.0) > 0.2, sq_mean                                               # not the constructor's 1
    d_j, d_k = 128, 8                                    # block4's 1x1 downsample: 128 channels in; k = 8; no ReLU
    bounds = {"weights_gen": math.sqrt(3 * 2 ** 0 / (2 ** 1 * d_j * d_k * sq_mean)),      # Eq. 1, a bias: s = 1
              "bias_gen": math.sqrt(3 * 2 ** 0 / (2 * d_k * sq_mean))}                    # Eq. 2
    for name, bound in bounds.items():
        largest = float(start[f"block4.downsample.hypernet.{name}.weight"].abs().max())
        assert bound * (1 - 3e-4) <= largest <= bound, (name, largest, bound)      # 32,768 and 2,048 draws
        assert not start[f"block4.downsample.hypernet.{name}.bias"].any()      # c = 0


def test_after_a_short_run_the_two_sexes_generate_different_weights_in_every_hyperlayer(brain_age_run):
    """The embeddings start at ones (one set of weights for both); 8 Adam steps at lr 1.5e-4 part them by ~1e-4."""
    def relative_differences(model):
        out = []
        for name in model.linears:
            h = getattr(model, name).hypernet
            with torch.no_grad():
                (w_male, b_male), (w_female, b_female) = (h.generate(h(torch.eye(2)[[s]])) for s in (0, 1))
            out += [float((w_male - w_female).norm() / w_male.norm()),
                    float((b_male - b_female).norm() / b_male.norm())]
        return out
    untrained = build_model("brain-age", "hyperfusion", image_shape=synthetic.BRAIN_AGE_SYNTH["shape"])
    assert relative_differences(untrained) == [0.0] * 8
    assert min(relative_differences(load_run(brain_age_run[1]).model())) > 2e-5     # 100x float32 rounding


# ----------------------------------------------------------------------------------------------
# Sec. 3.1.2, App. D: hyperlayer selection
# Each candidate layer is scored by the entropy of its losses over random re-initialisations, binned over one range
# shared by all layers.


class _ThreeLayers(nn.Module):
    """A loss that depends on `strong`, 1000x less on `weak`, not at all on `unused`."""

    def __init__(self):
        super().__init__()
        self.strong, self.weak, self.unused = nn.Linear(4, 1), nn.Linear(4, 1), nn.Linear(4, 1)

    def forward(self, image, tabular):
        return (self.strong(tabular) + 1e-3 * self.weak(tabular)).squeeze(1)


def test_loss_entropy_ranks_a_layer_the_loss_depends_on_above_one_it_ignores_over_one_range_and_a_seed_draws_alike():
    """An ignored layer scores 0, and so does one moving the loss 1000x less than another, however its losses spread."""
    batch = (None, torch.randn(16, 4, generator=torch.Generator().manual_seed(0)), torch.zeros(16))
    scores = dict(layer_loss_entropy(_ThreeLayers(), batch, F.mse_loss, n_draws=30))
    assert scores["unused"] == 0.0 and scores["weak"] == 0.0 and scores["strong"] > 1.0, scores

    def drawn(net, seed):   # every re-initialisation's loss: the seed's draws, whatever the global generator holds
        seen = []
        layer_loss_entropy(net, batch, lambda out, y: seen.append(F.mse_loss(out, y)) or seen[-1], n_draws=5, seed=seed)
        return torch.stack(seen)
    net = _ThreeLayers()
    assert torch.equal(drawn(net, 1), drawn(net, 1)) and not torch.equal(drawn(net, 1), drawn(net, 2))


def test_loss_entropy_scores_every_layer_of_the_ad_backbone():
    model = build_model("ad", "imaging", f=4)                          # Fig. 3B's layers, a quarter of the width
    batch = (torch.randn(2, 1, *AD_SMALL), torch.randn(2, 15), torch.tensor([0, 2]))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    scores = layer_loss_entropy(model, batch, F.cross_entropy, n_draws=3)
    assert len(scores) == 1 + 4 * 3 + 2 and scores[0][1] >= scores[-1][1]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # weights restored


def test_loss_entropy_draws_each_layer_100_times_by_default_in_the_function_and_the_command(monkeypatch):
    """Sec. 3.1.2's N = 100 re-initialisations per candidate layer."""
    losses, seen = [], []
    layer_loss_entropy(_ThreeLayers(), (None, torch.randn(4, 4), torch.zeros(4)),
                       lambda out, y: losses.append(1) or out.sum())
    assert len(losses) == 3 * 100
    monkeypatch.setattr(evaluate, "select_layers",
                        lambda task, csv, images, folder, samples, draws, *a: seen.append(draws) or [])
    evaluate.main(["select-layers", "--task", "ad", "--quiet"])
    assert seen == [100]


def test_select_layers_scores_every_candidate_layer(brain_age_cohort20, tmp_path, capsys):
    out = tmp_path / "new" / "layers.md"                              # its folder made, as predict.py's --out
    scores = evaluate.main(["select-layers", "--task", "brain-age", "--data-csv", brain_age_cohort20, "--samples", 2,
                            "--draws", 2, "--out", out, "--quiet"])
    assert out.read_text() in capsys.readouterr().out and "| -0.000 |" not in out.read_text()   # no entropy below 0
    image = data.read_brain_age_table(str(brain_age_cohort20)).image_paths[0]   # an input: refused before any draw
    assert_clean_error(run_main(evaluate.main, "select-layers", "--task", "brain-age", "--data-csv", brain_age_cohort20,
                                "--samples", 2, "--draws", 2, "--out", image), f"--out {image}: would overwrite")
    expected = candidate_layers(build_model("brain-age", "imaging", image_shape=synthetic.BRAIN_AGE_SYNTH["shape"]))
    assert sorted(n for n, _ in scores) == sorted(expected)
    assert [h for _, h in scores] == sorted((h for _, h in scores), reverse=True)


def test_select_layers_scores_on_a_batch_that_takes_the_classes_or_the_sexes_in_turn(ad_cohort60, brain_age_cohort20,
                                                                                       monkeypatch):
    seen, draws = [], []
    monkeypatch.setattr(evaluate, "layer_loss_entropy",
                        lambda model, batch, *a, **k: seen.append(batch) or draws.append(k["n_draws"]) or [])
    evaluate.select_layers("ad", data_csv=str(ad_cohort60), samples=6, draws=1)
    evaluate.select_layers("brain-age", data_csv=str(brain_age_cohort20), samples=4)
    (_, _, labels), (_, sex, target) = seen
    assert np.bincount(labels.numpy(), minlength=3).tolist() == [2, 2, 2] and sex.sum(0).tolist() == [2, 2]
    assert draws == [1, 100]                                       # Sec. 3.1.2's N = 100 when not given
    ages = data.read_brain_age_table(brain_age_cohort20).age         # the target centred as training centres it: on
    years = AgeTarget(float(ages.mean())).decode(target.numpy())     # the cohort's mean age, not the batch's own
    assert np.isin(np.round(years, 4), np.round(ages, 4)).all()
    assert_clean_error(run_main(evaluate.main, "select-layers", "--task", "ad", "--data-csv", ad_cohort60, "--samples",
                                61), "--samples 61", "has 60 subjects")    # not scored on fewer than its page says


# ----------------------------------------------------------------------------------------------
# Sec. 3.2: the loss (Eq. 3-5) and the training loop
# Adam minimises Eq. 4 (brain age) or Eq. 5 (AD) with Eq. 3's decay, from clean gradients in training mode; the
# epoch best on the validation rows is kept and tested.


def _ba_args(cohort, out, *extra):
    """train_brain_age.py's options of a quiet float32 run on `cohort` into `out`."""
    return ["--data-csv", str(cohort), "--out", str(out), "--quiet", "--precision", "fp32", *extra]


def _random_weights(state):
    """Names of the weights drawn at random (of convolutions, linear layers, generators; not the sex embeddings')."""
    return [k for k, v in state.items() if k.endswith("weight") and v.dim() >= 2
            and not (k.startswith(("linear", "final_layer")) and ".hypernet.embedding." in k)]


def _test_set_outputs(checkpoint):
    """A checkpoint's outputs on its run's test set, rebuilt as predict.test_set does: class probabilities of the
    AD tabular model, ages in years for brain age. -> (subjects, outputs)."""
    finished_run, cpu = load_run(checkpoint), torch.device("cpu")
    run, table, test_idx, images = predict.test_set(finished_run)
    if run.task == "ad":
        rows = finished_run.tabular.transform([table.raw[i] for i in test_idx])
        ds, decode = data.TabularDataset(rows, table.labels[test_idx]), lambda logits: torch.softmax(logits, 1)
    else:
        ds = data.BrainAgeDataset(images, data.sex_onehot(table.sex[test_idx]), table.age[test_idx])
        decode = finished_run.target.decode
    outputs, _ = training.predict(finished_run.model(), training.make_loader(ds, 8, 0, cpu), cpu, decode,
                                  training.replay_precision(run.precision, cpu))       # as the run tested
    return np.array(table.subjects)[test_idx], outputs


class _Batches:
    """A loader whose batches are recorded as fit() draws them (its sampler kept for set_epoch)."""

    def __init__(self, loader, seen):
        self.loader, self.sampler, self.seen = loader, loader.sampler, seen

    def __iter__(self):
        for batch in self.loader:
            self.seen.append(batch)
            yield batch


def _spy_adam(monkeypatch, stop=False):
    """[(params, kwargs)] of every Adam made, a _Stop raised at the first if `stop`."""
    made = []

    class SpyAdam(torch.optim.Adam):
        def __init__(self, params, **kwargs):
            made.append((list(params), kwargs))
            if stop:
                raise _Stop
            super().__init__(made[-1][0], **kwargs)

    monkeypatch.setattr(torch.optim, "Adam", SpyAdam)
    return made


def test_eq3_every_trained_parameter_is_decayed_with_the_runs_lambda_and_generated_weights_are_none(tmp_path,
                                                                                                      monkeypatch):
    """Eq. 3: lambda (||theta_P_internal||^2 + ||theta_H||^2); no hyperlayer holds the generated weight's shape."""
    for model in (build_model("brain-age", "hyperfusion", image_shape=BRAIN_AGE_SMALL),
                  build_model("ad", "hyperfusion", n_tabular=15)):
        for layer in (m for m in model.modules() if isinstance(m, (HyperConv, HyperLinear))):
            assert all(tuple(p.shape) != layer.weight_shape for p in layer.parameters()), layer

    class Net(nn.Module):                          # an internal linear layer, then a hyperlayer with its embedding
        def __init__(self):
            super().__init__()
            self.fc, self.hyper = nn.Linear(3, 6), HyperLinear(6, 2, nn.Linear(2, 2), 2)

        def forward(self, image, tabular):
            return self.hyper(F.relu(self.fc(image)), tabular)

    made, model = _spy_adam(monkeypatch), _randomise(Net(), seed=5)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert {n.split(".")[0] for n in before} == {"fc", "hyper"} and len(before) == 8
    items = torch.utils.data.TensorDataset(torch.randn(8, 3), torch.randn(8, 2), torch.zeros(8))
    run = RunConfig(task="ad", model="hyperfusion", version=0, split_seed=0, epochs=1, batch_size=8, lr=1e-3,
                    weight_decay=0.01, data_csv="ad.csv")
    training.fit(model, torch.utils.data.DataLoader(items, batch_size=8), lambda out, y: 0 * out.sum(),
                 lambda m: {"score": 0.0}, "score", run, str(tmp_path), {"n_tabular": 2}, quiet=True)
    (params, kwargs), = made
    assert {id(p) for p in params} == {id(p) for p in model.parameters()} and kwargs["weight_decay"] == 0.01
    for n, p in model.named_parameters():             # a zero gradient: Adam's first step is the decay's, lr to 0
        torch.testing.assert_close(p.detach(), before[n] - 1e-3 * before[n].sign(), rtol=0, atol=1e-5, msg=n)


@pytest.mark.parametrize("scale", [10.0, 4.0])
def test_brain_age_decay_over_the_target_scale_squared_gives_the_steps_of_lambda_on_ages_in_years(scale):
    """Ages / s make L2 s^2 as strong: gradients are 1/s^2 those in years; Adam, scale-blind, steps alike."""
    target, lam = AgeTarget(centre=63.0, scale=scale), 0.5
    torch.manual_seed(0)
    x, age = torch.randn(16, 3), 40 + 40 * torch.rand(16)
    nets = [_randomise(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1)), seed=2) for _ in range(2)]
    losses = (lambda net: F.mse_loss(net(x).squeeze(1), target.encode(age)),
              lambda net: F.mse_loss(target.decode(net(x).squeeze(1)), age))
    decays = (target.decay(lam), lam)
    for net, loss, decay in zip(nets, losses, decays):
        (loss(net) + decay * sum(p.pow(2).sum() for p in net.parameters())).backward()
    for a, b in zip(*(net.parameters() for net in nets)):
        torch.testing.assert_close(a.grad, b.grad / scale ** 2, rtol=1e-5, atol=1e-7)
    opts = [torch.optim.Adam(net.parameters(), lr=1e-2, weight_decay=decay) for net, decay in zip(nets, decays)]
    for _ in range(5):
        for opt, net, loss in zip(opts, nets, losses):
            opt.zero_grad()
            loss(net).backward()
            opt.step()
    for a, b in zip(*(net.parameters() for net in nets)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_brain_age_minimises_eq4_on_the_centred_age_and_gives_adam_the_runs_decay_over_the_target_scale_squared(
        brain_age_cohort20, tmp_path, monkeypatch):
    """Eq. 4, (1/B) sum_b (y_hat_b - (age_b - centre) / s)^2 (s = 1 by default), and lambda / s^2 on every parameter."""
    assert AgeTarget(centre=50.0).encode(np.array([62.0])) == pytest.approx([12.0])
    seen, made, real, scale = [], _spy_adam(monkeypatch, stop=True), train_brain_age.fit, 10.0
    monkeypatch.setattr(train_brain_age, "AgeTarget", lambda centre: AgeTarget(centre, scale))    # ages in decades
    monkeypatch.setattr(train_brain_age, "fit", lambda model, loader, loss_fn, *a, **k: seen.append(
        (loss_fn, k["state"]["target"])) or real(model, loader, loss_fn, *a, **k))
    with pytest.raises(_Stop):
        train_brain_age.main(_ba_args(brain_age_cohort20, tmp_path, "--epochs", "1", "--batch-size", "4",
                                      "--weight-decay", "0.05"))
    (params, kwargs), = made
    assert kwargs["weight_decay"] == pytest.approx(0.05 / scale ** 2, rel=1e-9)
    assert len(params) == len(list(build_model("brain-age", "hyperfusion", image_shape=BRAIN_AGE_SMALL).parameters()))
    (loss_fn, target), = seen
    assert target["scale"] == scale
    g = torch.Generator().manual_seed(0)
    pred, age = torch.randn(6, generator=g, requires_grad=True), torch.rand(6, generator=g) * 80 + 8
    by_hand = pred.detach().clone().requires_grad_()
    expected = ((by_hand - (age - target["centre"]) / scale) ** 2).sum() / 6              # Eq. 4
    loss = loss_fn(pred, age)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    expected.backward()
    torch.testing.assert_close(pred.grad, by_hand.grad)


def test_eq5_weighted_cross_entropy_is_divided_by_the_batch_size_not_by_the_sum_of_the_targets_weights():
    torch.manual_seed(0)
    logits, target = torch.randn(5, 3), torch.tensor([0, 1, 1, 2, 2])
    w = torch.tensor([0.9, 0.6, 2.4])                                     # the targets' weights sum to 6.9, B = 5
    log_p = [math.log(float(torch.softmax(logits[b], 0)[y])) for b, y in enumerate(target.tolist())]
    by_hand = -sum(float(w[y]) * lp for y, lp in zip(target.tolist(), log_p)) / 5          # Eq. 5
    assert float(train_ad.wce_loss(logits, target, w)) == pytest.approx(by_hand, rel=1e-6)
    assert float(F.cross_entropy(logits, target, weight=w)) == pytest.approx(by_hand * 5 / 6.9, rel=1e-6)


def test_the_loop_steps_on_eq5_gradients_alone_in_training_mode_and_keeps_the_epoch_best_on_validation_rows(
        ad_cohort60, tmp_path, monkeypatch):
    """Each step's gradient is Eq. 5's on its batch alone, in train mode; best.pt holds the first epoch best on val."""
    table = data.read_ad_table(ad_cohort60, need_images=False)
    parts = dict(zip(("train", "val", "test"), _ad_parts(table)))
    rows = torch.as_tensor(TabularPreprocessor().fit([table.raw[i] for i in parts["train"]]).transform(table.raw))
    class_weights = lambda idx: (lambda n: n.sum() / (3 * n))(np.bincount(table.labels[idx], minlength=3))
    w = torch.tensor(class_weights(np.concatenate([parts["train"], parts["val"]])), dtype=torch.float32)   # N / (C n_c)
    for other in (parts["train"], np.arange(len(table.labels))):     # the cohort tells them apart
        assert not np.allclose(class_weights(other), w.numpy(), rtol=1e-3)
    batches, steps, epochs, losses, real_fit, real_optimizer = [], [], [], [], train_ad.fit, training.make_optimizer

    def optimizer(model, *args):
        opt = real_optimizer(model, *args)
        real_step = opt.step

        def step(*a, **k):
            _, tabular, target = batches[-1]
            steps.append(model.training)
            twin = copy.deepcopy(model).train()
            log_p = F.log_softmax(twin(None, tabular), 1)[torch.arange(len(target)), target]
            loss = -(w[target] * log_p).sum() / len(target)                                        # Eq. 5
            eq5, _ = torch.autograd.grad(loss, list(twin.parameters())), losses.append(loss.item())
            for p, g in zip(model.parameters(), eq5):
                torch.testing.assert_close(p.grad, g)
            return real_step(*a, **k)
        opt.step = step
        return opt

    def scored(validate, m):
        score = validate(m)
        with torch.no_grad():                                                                 # m is in eval()
            ba = {part: classification_metrics(table.labels[idx], torch.softmax(m(None, rows[idx]), 1).numpy(),
                                               NAMES)["balanced_accuracy"] for part, idx in parts.items()}
        epochs.append((score["balanced_accuracy"], ba, copy.deepcopy(m.state_dict())))
        return score

    monkeypatch.setattr(training, "make_optimizer", optimizer)
    monkeypatch.setattr(train_ad, "fit", lambda model, loader, loss_fn, validate, *a, **k: real_fit(
        model, _Batches(loader, batches), loss_fn, lambda m: scored(validate, m), *a, **k))
    shutil.copy(ad_cohort60, tmp_path / "table.csv")                       # the tabular model needs no images
    train_ad.main(_tabular_args(tmp_path / "table.csv", tmp_path, "--epochs", "4", "--lr", "3e-2"))
    assert len(steps) == 4 * 4 and all(steps)                                 # 36 training rows, batches of 8
    orders = {torch.cat([tab for _, tab, _ in batches[4 * e:4 * e + 4]]).numpy().tobytes() for e in range(4)}
    assert len(orders) == 4                                                   # each epoch shuffled anew
    run_dir = _run_dir(tmp_path, "tabular")
    with open(os.path.join(run_dir, "log.csv")) as f:                         # the logged loss: the epoch's Eq. 5
        logged = [float(row["train_loss"]) for row in csv.DictReader(f)]
    np.testing.assert_allclose(logged, np.reshape(losses, (4, 4)).mean(1), rtol=1e-5)
    scores = [s for s, _, _ in epochs]
    assert scores == [ba["val"] for _, ba, _ in epochs]
    kept = int(np.argmax(scores))
    for other in ("test", "train"):                                   # the rows tell the epochs apart differently
        assert int(np.argmax([ba[other] for _, ba, _ in epochs])) != kept, other
    best = training.load_checkpoint(os.path.join(run_dir, "best.pt"))
    assert best["epoch"] == kept and json.load(open(os.path.join(run_dir, "metrics.json")))["best_epoch"] == kept
    for k, v in epochs[kept][2].items():
        assert torch.equal(best["model"][k], v), k


@pytest.mark.parametrize("scores,lower_is_better", [([0.3, 0.9, 0.5, 0.9], False),    # balanced accuracy, a tie:
                                                    ([6.0, 2.0, 4.0, 2.0], True)])     # MAE; the first is kept
def test_best_pt_holds_the_first_epoch_with_the_best_validation_score_and_last_pt_the_last(tmp_path, scores,
                                                                                            lower_is_better):
    best, weights = _scripted_fit(tmp_path, scores, lower_is_better)
    assert best["epoch"] == 1 and best["score"] == scores[1] and best["metrics"] == {"score": scores[1]}   # its metrics
    kept, last = (training.load_checkpoint(os.path.join(tmp_path, f)) for f in ("best.pt", "last.pt"))
    assert kept["epoch"] == 1 and last["epoch"] == len(scores) - 1
    for k, v in weights[1].items():
        torch.testing.assert_close(kept["model"][k], v, rtol=0, atol=0)               # epoch 2's weights
        torch.testing.assert_close(last["model"][k], weights[-1][k], rtol=0, atol=0)
    assert not torch.equal(weights[1]["linear.weight"], weights[-1]["linear.weight"])  # the epochs differ


@pytest.mark.parametrize("task", ["ad", "brain-age"])
def test_the_training_scripts_test_with_the_best_epochs_checkpoint_not_the_last(task, ad_cohort60, brain_age_cohort20,
                                                                                tmp_path, monkeypatch):
    def best_then_worse(model, train_loader, loss_fn, validate, score_key, run, run_dir, inputs, state=None, **_):
        """fit's contract without training: best.pt holds epoch 1, then the model in memory and last.pt move on."""
        os.makedirs(run_dir, exist_ok=True)
        metrics = validate(model)
        header = {"run": dataclasses.asdict(run), "inputs": inputs, **(state or {})}
        training.save_checkpoint({"model": model.state_dict(), "epoch": 0, **header}, os.path.join(run_dir, "best.pt"))
        _randomise(model, seed=1)
        training.save_checkpoint({"model": model.state_dict(), "epoch": 1, **header}, os.path.join(run_dir, "last.pt"))
        return {"epoch": 0, "score": metrics[score_key], "metrics": metrics}

    ad = task == "ad"
    module, cohort, model = (train_ad, ad_cohort60, "tabular") if ad else (train_brain_age, brain_age_cohort20,
                                                                             "imaging")
    monkeypatch.setattr(module, "fit", best_then_worse)
    module.main(["--data-csv", str(cohort), "--out", str(tmp_path), "--epochs", "1", "--quiet", "--model", model])
    run_dir = _run_dir(tmp_path, model, 0) if ad else training.brain_age_run_dir(tmp_path, model, 0)
    saved = load_run(run_dir).read_predictions()
    for name, same in (("best.pt", True), ("last.pt", False)):
        subjects, outputs = _test_set_outputs(os.path.join(run_dir, name))
        assert list(subjects) == list(saved["subjects"])
        assert np.allclose(outputs, saved["probs" if ad else "pred"], atol=1e-5) == same, name


@pytest.mark.parametrize("task,model", [("ad", "imaging"), ("ad", "hyperfusion"), ("brain-age", "hyperfusion")])
def test_versions_are_independent_initialisations_and_one_version_twice_starts_from_the_same_weights(
        task, model, ad_cohort60, brain_age_cohort20, tmp_path, monkeypatch):
    def initial(version, out):
        if task == "ad":
            argv = _ad_args(ad_cohort60, tmp_path / out, "--model", model, "--version", str(version))
            return _initial_weights(train_ad, argv, monkeypatch, pretrained=models.TabularMLP)
        return _initial_weights(train_brain_age, _ba_args(brain_age_cohort20, tmp_path / out, "--epochs", "1",
                                "--batch-size", "4", "--model", model, "--version", str(version)), monkeypatch)
    v0, v1, v0_again = initial(0, "a"), initial(1, "b"), initial(0, "a")   # AD: the v0 MLP trained, then reused
    names = _random_weights(v0)
    generators = [k for k in names if "weights_gen" in k or "bias_gen" in k]
    assert len(generators) == (2 if task == "ad" else 8) if model == "hyperfusion" else not generators
    assert v0.keys() == v0_again.keys() and all(torch.equal(v0[k], v0_again[k]) for k in v0)
    assert [k for k in names if torch.equal(v0[k], v1[k])] == []
    if model == "hyperfusion" and task == "ad":        # the embedding comes from the MLP of the same version
        key = "block4.downsample.hypernet.embedding.0.weight"
        assert not torch.equal(v0[key], v1[key])


@pytest.mark.parametrize("task", ["ad", "brain-age"])
def test_a_run_writes_its_checkpoints_log_predictions_and_metrics_with_one_log_row_an_epoch(task, request):
    """AD: HyperFusion, one epoch, its tabular MLP beside it; brain age: two epochs, MAEs in years."""
    if task == "ad":
        runs, epochs = request.getfixturevalue("ad_fold_runs"), 1
        run = _run_dir(runs, "hyperfusion")
        assert os.path.isfile(os.path.join(_run_dir(runs, "tabular"), "best.pt"))  # the pre-trained embedding
    else:
        (returned, run), epochs = request.getfixturevalue("brain_age_run"), 2
    assert {"best.pt", "last.pt", "log.csv", "metrics.json", "predictions.npz"} <= set(os.listdir(run))
    assert no_temp_files(run) and len(open(os.path.join(run, "log.csv")).read().strip().splitlines()) == 1 + epochs
    saved, tested = json.load(open(os.path.join(run, "metrics.json"))), np.load(os.path.join(run, "predictions.npz"))
    ckpt = training.load_checkpoint(os.path.join(run, "last.pt"))
    assert ckpt["epoch"] == epochs - 1 and ckpt["run"]["model"] == "hyperfusion"
    if task == "brain-age":
        expected = json.loads(json.dumps(regression_metrics(tested["age"], tested["pred"], tested["sex"])))
        assert {k: saved["test"][k] for k in expected} == expected
        assert all(0.0 < m[s][k] < 100.0 for m in (saved, returned) for s in ("val", "test")
                   for k in ("mae", "mae_male", "mae_female"))
        return
    assert saved["test"] == json.loads(json.dumps(classification_metrics(tested["labels"], tested["probs"], NAMES)))
    for m in (saved["val"], saved["test"]):
        assert all(0.0 <= m[k] <= 1.0 for k in ("balanced_accuracy", "precision", "f1_macro"))
        assert set(m["tp_rate"]) == {"CN", "MCI", "AD"} and np.array(m["confusion_matrix"]).shape == (3, 3)
    assert sum(map(sum, saved["test"]["confusion_matrix"])) == 12  # subset 4 of 60 subjects
    assert TabularPreprocessor(state=ckpt["tabular"]).n_features == ckpt["inputs"]["n_tabular"] == 15


# ----------------------------------------------------------------------------------------------
# Sec. 3.3, 4.3.3: tabular attributes and missing values
# Sex one-hot, z-scores and iterative imputation fitted on the training rows alone, a missing indicator for each
# attribute empty there.


def rows_with_missing(n=60, seed=0):
    """Raw rows like ADTable.raw; CSF missing in every third row, AV45 in every other, FDG every fourth."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        r = {"AGE": f"{rng.normal(73, 7):.1f}", "PTGENDER": "Male" if i % 2 else "Female",
             "PTEDUCAT": str(rng.integers(8, 20)), "APOE4": str(rng.integers(0, 3)),
             "ABETA": f"{rng.normal(900, 300):.1f}", "PTAU": f"{rng.normal(25, 8):.1f}",
             "TAU": f"{rng.normal(280, 90):.1f}", "FDG": f"{rng.normal(6, 0.6):.2f}"}
        r["AV45"] = "" if i % 2 else f"{rng.normal(1.2, 0.2):.2f}"
        r["FDG"] = "" if i % 4 == 0 else r["FDG"]
        r.update(dict.fromkeys(["ABETA", "PTAU", "TAU"], "") if i % 3 == 0 else {"ABETA": ">1700"} if i == 5 else {})
        rows.append(r)
    return rows


def test_censored_csf_values_read_as_the_assay_limit_and_no_other_value_is_read_censored():
    assert (data.parse_value(">1700"), data.parse_value("<8")) == (1700.0, 8.0) and np.isnan(data.parse_value(""))
    cells = (("ABETA", ">1700"), ("PTAU", "<8"), ("TAU", "< 80"))
    assert [data.parse_attribute(c, v) for c, v in cells] == [1700.0, 8.0, 80.0]
    for col in ("AGE", "Age", "FDG", "AV45", "APOE4", "PTEDUCAT"):    # a brain age of `>80` is no age
        with pytest.raises(ValueError, match="only the CSF assays"):
            data.parse_attribute(col, ">80")
    with pytest.raises(ValueError):
        data.parse_value("high")


def test_na_cells_of_an_r_export_read_as_empty_ones():
    rows = rows_with_missing()
    rows[7]["PTGENDER"] = ""
    tp = TabularPreprocessor().fit(rows)
    for na in ("NA", "nan", "N/A", "NULL"):                   # ADNIMERGE as R writes it, pandas, a database export
        as_r = [{k: na if v == "" else v for k, v in r.items()} for r in rows]
        assert TabularPreprocessor().fit(as_r).state == tp.state
        assert np.array_equal(tp.transform(as_r), tp.transform(rows))


def test_imputation_is_fitted_on_training_rows_only_and_its_state_round_trips_exactly(tmp_path):
    rows = rows_with_missing()
    train, test = rows[:45], [dict(r) for r in rows[45:]]
    tp = TabularPreprocessor().fit(train)
    state = copy.deepcopy(tp.state_dict())
    test[0]["ABETA"], test[1]["FDG"], test[2]["AGE"] = "5", "", "99"
    test.append({"AGE": "55", "PTGENDER": "Male", "PTEDUCAT": "", "APOE4": "2", "ABETA": ">1700",
                 "PTAU": "<8", "TAU": "", "FDG": "", "AV45": ""})
    tp.transform(test)
    assert tp.state_dict() == state                                   # transforming held-out rows changes nothing
    torch.save({"tabular": state}, tmp_path / "ck.pt")
    for back in (TabularPreprocessor(state=torch.load(tmp_path / "ck.pt", weights_only=True)["tabular"]),
                 TabularPreprocessor(state=json.loads(json.dumps(state)))):
        assert back.columns == tp.columns and np.array_equal(tp.transform(rows), back.transform(rows))
    for older in (dict(state, version=1), {k: v for k, v in state.items() if k != "steps"}):   # an older format
        with pytest.raises(UserError, match="not a version-2 TabularPreprocessor state"):
            TabularPreprocessor(state=older)


def test_the_sex_one_hot_is_male_then_female_in_both_tasks_so_a_saved_run_reads_each_sex_as_it_was_trained():
    """Brain age's codes (0 male, 1 female) and AD's PTGENDER: a checkpoint's first column means male in both."""
    assert np.array_equal(data.sex_onehot(np.array([0, 1, 1])), np.array([[1, 0], [0, 1], [0, 1]], np.float32))
    rows = rows_with_missing()
    tp = TabularPreprocessor().fit(rows)
    assert tp.columns[:2] == ["PTGENDER_Male", "PTGENDER_Female"]
    sexes = np.array([r["PTGENDER"] == "Female" for r in rows], np.int64)
    assert np.array_equal(tp.transform(rows)[:, :2], data.sex_onehot(sexes))


def test_an_imputed_sex_is_a_probability_its_two_columns_in_0_1_summing_to_1_however_far_its_neighbours_lie():
    """Regressed on the other attributes and clipped: a row far outside the training rows' range is one sex for sure."""
    rows = rows_with_missing()
    for i, r in enumerate(rows):                     # women 60 years old, men 85: age predicts sex almost exactly
        r["AGE"] = f"{60 + 25 * (r['PTGENDER'] == 'Male') + (i % 5) * 0.5:.1f}"
    rows[0]["PTGENDER"] = rows[1]["PTGENDER"] = ""   # a step for sex in the imputation
    tp = TabularPreprocessor().fit(rows)
    far = [dict(rows[2], PTGENDER="", AGE=age) for age in ("20", "130")]
    onehot = tp.transform(far)[:, :2]
    assert np.array_equal(onehot, np.array([[0, 1], [1, 0]], np.float32)), onehot


def test_training_rows_without_an_empty_cell_read_a_new_patients_empty_cells_as_their_means_sex_too():
    """Nothing imputed in training, no step to replay: an empty cell is the training mean (a z-score of 0), an empty
    sex the share of women (23 of 45), not a man for sure (0, in the sex column)."""
    complete = [{a: v or "1.0" for a, v in r.items()} for r in rows_with_missing()[:45]]
    tp = TabularPreprocessor().fit(complete)
    X = tp.transform([dict(complete[0], PTGENDER="", AGE="")])
    np.testing.assert_allclose(X[0, :3], [22 / 45, 23 / 45, 0], rtol=1e-6, atol=1e-6)   # male, female, AGE


def test_missing_indicators_are_for_the_attributes_with_empty_cells_in_the_training_rows_alone_and_no_nan_remains():
    rows = rows_with_missing()
    train, held_out = rows[:45], [dict(r) for r in rows[45:]]
    train[7]["APOE4"] = ""                                          # empty in one training row only
    for r in held_out:                                              # empty, or -4, outside training only
        r["AGE"], r["PTEDUCAT"], r["PTGENDER"] = "", "-4", ""
    tp = TabularPreprocessor().fit(train)
    empty_in_training = [a for a in data.AD_CONTINUOUS if any(r[a] == "" for r in train)]
    assert empty_in_training == ["APOE4", "ABETA", "PTAU", "TAU", "FDG", "AV45"]
    assert tp.columns == COLUMNS + [f"{a}_missing" for a in empty_in_training]
    for part in (train, held_out, held_out[:1], rows):              # the same columns whatever rows come in
        X = tp.transform(part)
        assert X.dtype == np.float32 and X.shape == (len(part), tp.n_features) and np.isfinite(X).all()
    z = tp.transform(train)[:, tp.columns.index("AGE")]
    assert abs(z.mean()) < 1e-5 and abs(z.std() - 1) < 1e-4       # z-scored with training statistics
    X = tp.transform(held_out)
    assert (X[:, tp.columns.index("APOE4_missing")] == 0).all()     # filled in every held-out row
    np.testing.assert_array_equal(X[:, tp.columns.index("ABETA_missing")], [r["ABETA"] == "" for r in held_out])


def test_a_column_constant_over_the_training_rows_is_z_scored_about_its_value_not_read_as_missing():
    rows = rows_with_missing()
    train, held_out = rows[:45], [dict(rows[45], APOE4="2")]
    for r in train:
        r["APOE4"] = "1"                                        # one value in every training row: std 0
    tp = TabularPreprocessor().fit(train)
    assert "APOE4_missing" not in tp.columns
    col = tp.columns.index("APOE4")
    assert (tp.transform(train)[:, col] == 0).all() and tp.transform(held_out)[0, col] == 1.0   # (2 - 1) / 1


def test_imputation_replays_scikit_learns_iterative_imputer():
    rows = rows_with_missing()
    for i in (3, 50):
        rows[i]["PTGENDER"] = ""                                # sex is imputed like the others
    tp = TabularPreprocessor().fit(rows[:45])
    sex, X = tp.parse(rows)
    Z = np.concatenate([(X - np.array(tp.state["mean"])) / np.array(tp.state["std"]), sex[:, None]], 1)
    imp = IterativeImputer(max_iter=10, random_state=0, keep_empty_features=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                         # ConvergenceWarning after max_iter rounds
        imp.fit(Z[:45])
    expected = imp.transform(Z)
    out = tp.transform(rows)
    np.testing.assert_allclose(out[:, 2:10], expected[:, :8], atol=1e-5)
    female = np.clip(expected[:, 8], 0, 1)
    np.testing.assert_allclose(out[:, :2], np.stack([1 - female, female], 1), atol=1e-5)
    assert tp.columns[-1] == "PTGENDER_missing" and out[3, -1] == 1 and out[4, -1] == 0


def test_a_training_run_fits_its_z_scores_imputation_and_missing_indicators_on_its_training_rows_only(ad_cohort60,
                                                                                                        tmp_path):
    """Only the held-out rows hold extreme ABETA, FDG and AV45 and empty education; one training row no APOE4."""
    table = data.read_ad_table(ad_cohort60, need_images=False)
    tr, va, te = _ad_parts(table)
    header = open(ad_cohort60).readline().strip().split(",")
    held_out_lines = set((np.concatenate([va, te]) + 2).tolist())        # CSV line numbers, the header is line 1

    held_out = dict(PTEDUCAT="", ABETA="900000", FDG="60", AV45="40")

    def edit(line, cells):
        new = held_out if line in held_out_lines else {"APOE4": ""} if line == tr[0] + 2 else {}
        return [new.get(col, c) for col, c in zip(header, cells)]

    train_ad.main(_tabular_args(_edit_table(ad_cohort60, tmp_path / "ad.csv", edit), tmp_path))
    ckpt = training.load_checkpoint(os.path.join(_run_dir(tmp_path, "tabular"), "best.pt"))
    table = data.read_ad_table(tmp_path / "ad.csv", need_images=False)        # age, sex, diagnosis: the same split
    assert all(np.array_equal(a, b) for a, b in zip((tr, va, te), _ad_parts(table)))
    state = ckpt["tabular"]
    X = np.array([[data.parse_attribute(a, table.raw[i][a]) for a in data.AD_CONTINUOUS] for i in tr])
    np.testing.assert_allclose(state["mean"], np.nanmean(X, 0), rtol=1e-12)
    np.testing.assert_allclose(state["std"], np.nanstd(X, 0), rtol=1e-12)
    # the imputer starts from the training means (0 once z-scored; sex: the share of women) and fits its steps there
    np.testing.assert_allclose(state["init"][:8], 0, atol=1e-9)
    assert state["init"][8] == pytest.approx(table.sex[tr].mean()) and state["steps"]
    assert state == TabularPreprocessor().fit([table.raw[i] for i in tr]).state_dict()
    for rows in (np.concatenate([tr, va]), np.arange(len(table.labels))):  # the edited rows would show
        assert state != TabularPreprocessor().fit([table.raw[i] for i in rows]).state_dict()
    expected = [a for a, e in zip(data.AD_CONTINUOUS, np.isnan(X).any(0)) if e]
    expected += ["PTGENDER"] if (table.sex[tr] < 0).any() else []
    assert "APOE4" in expected and "PTEDUCAT" not in expected and state["indicators"] == expected  # see the docstring
    assert ckpt["inputs"]["tabular_columns"] == COLUMNS + [f"{a}_missing" for a in expected]
    assert ckpt["inputs"]["n_tabular"] == len(COLUMNS) + len(expected)


def test_empty_age_sex_education_and_apoe4_cells_are_imputed_and_the_split_does_not_depend_on_them(ad_cohort60,
                                                                                                       tmp_path):
    emptied = {2: "AGE", 3: "AGE", 4: "PTGENDER", 5: "PTGENDER", 6: "PTEDUCAT", 7: "APOE4", 8: "AGE"}  # line: column
    header = open(ad_cohort60).readline().strip().split(",")
    edit = lambda line, cells: ["" if header[k] == emptied.get(line) else c for k, c in enumerate(cells)]
    csv_path = _edit_table(ad_cohort60, os.path.join(os.path.dirname(ad_cohort60), "ad_empty_cells.csv"), edit)
    table = data.read_ad_table(csv_path)                                           # beside the images
    unknown = np.flatnonzero(np.isnan(table.age) | (table.sex < 0))
    assert len(unknown) == 5
    subsets = data.ad_split(table.sex, table.labels, table.age, 0)
    assert np.array_equal(subsets, data.ad_split(table.sex, table.labels, table.age, 0))    # run to run
    assert set(subsets[unknown]) <= set(range(5))                                          # each lands in a subset
    tests = [data.ad_fold(subsets, f)[2] for f in range(4)]
    assert all(np.array_equal(tests[0], t) for t in tests)                                 # every fold alike
    prep = TabularPreprocessor().fit([table.raw[i] for i in data.ad_fold(subsets, 1)[0]])
    assert np.isfinite(prep.transform(table.raw)).all() and {"AGE_missing", "PTGENDER_missing"} <= set(prep.columns)
    train_ad.main(_ad_args(csv_path, tmp_path, "--model", "hyperfusion", "--epochs", "1"))   # its tabular MLP first
    for model in ("tabular", "hyperfusion"):
        probs = load_run(_run_dir(tmp_path, model)).read_predictions()["probs"]
        assert len(probs) == len(tests[0]) and np.isfinite(probs).all()


# ----------------------------------------------------------------------------------------------
# Sec. 3.4: ensembles and metrics (Eq. 6-10)
# Brain-age members are averaged (Eq. 6), AD members weighted by their inverse entropies (Eq. 7-8); the metrics (Eq.
# 9-10, AUC, MAE) as defined.


def test_eq7_8_weight_each_member_by_its_inverse_entropy_sample_by_sample_and_eq6_takes_the_mean():
    rng = np.random.default_rng(5)
    probs = np.stack([random_probs(rng, 6, sharp=s) for s in (0.3, 3.0, 1.0)])       # flat, sharp, between
    combined = entropy_weighted_ensemble(probs)
    np.testing.assert_allclose(combined, _eq7_8_by_hand(probs), rtol=1e-12)
    assert not np.allclose(combined, probs.mean(0), atol=1e-3)                       # not the plain mean
    # equal entropies (a permutation keeps it) give the plain mean
    np.testing.assert_allclose(entropy_weighted_ensemble(np.array([[[0.7, 0.2, 0.1]], [[0.1, 0.2, 0.7]]])),
                               [[0.4, 0.2, 0.4]], atol=1e-12)
    three = np.array([[[0.5, 0.3, 0.2]], [[0.2, 0.5, 0.3]], [[0.3, 0.2, 0.5]]])
    np.testing.assert_allclose(entropy_weighted_ensemble(three), [[1 / 3, 1 / 3, 1 / 3]], atol=1e-12)
    sharp, flat = [0.98, 0.01, 0.01], [1 / 3, 1 / 3, 1 / 3]
    h_sharp, h_flat = -(0.98 * math.log(0.98) + 2 * 0.01 * math.log(0.01)), math.log(3)     # 0.1119, 1.0986 nats
    assert entropy(flat) == pytest.approx(h_flat)
    a_sharp = (1 / h_sharp) / (1 / h_sharp + 1 / h_flat)                  # Eq. 8: 0.9076
    expected = a_sharp * np.array(sharp) + (1 - a_sharp) * np.array(flat)  # Eq. 7
    out = entropy_weighted_ensemble(np.array([[sharp, flat], [flat, sharp]]))      # the members swap roles
    np.testing.assert_allclose(out, [expected, expected], rtol=1e-9)
    assert out[0, 0] > 0.9 > np.mean([0.98, 1 / 3]) and np.allclose(out.sum(1), 1.0)
    ages = np.array([[50.0, 20.0], [52.0, 30.0], [60.0, 70.0]])                      # (K=3, N=2)
    np.testing.assert_allclose(metrics.mean_ensemble(ages), [(50 + 52 + 60) / 3, (20 + 30 + 70) / 3], rtol=1e-12)


def test_metrics_against_a_hand_made_confusion_matrix_and_maes_by_hand():
    cm = np.array([[4, 1, 0], [2, 2, 1], [0, 1, 1]])              # rows: true CN, MCI, AD
    labels = np.repeat([0, 1, 2], cm.sum(1))
    pred = np.repeat(np.tile([0, 1, 2], 3), cm.ravel())           # row by row, as many of each as the cell says
    m = classification_metrics(labels, np.eye(3)[pred] * 0.8 + 0.2 / 3, NAMES)
    recall, precision = [4 / 5, 2 / 5, 1 / 2], [4 / 6, 2 / 4, 1 / 2]    # TP / (TP + FN): rows; TP / (TP + FP): columns
    assert m["confusion_matrix"] == cm.tolist() and m["n"] == 12
    assert m["tp_rate"] == pytest.approx(dict(zip(NAMES, recall)))
    accuracy = 7 / 12                               # = micro precision; neither is Eq. 9 or 10
    assert len({round(v, 4) for v in (accuracy, np.mean(recall), np.mean(precision))}) == 3
    assert m["balanced_accuracy"] == pytest.approx(np.mean(recall))     # Eq. 9: 0.5667
    assert m["precision"] == pytest.approx(np.mean(precision))          # Eq. 10: 0.5556
    assert m["f1_macro"] == pytest.approx(np.mean([2 * p * r / (p + r) for p, r in zip(precision, recall)]))
    never_ad = np.where(pred == 2, 1, pred)                       # AD never predicted: its TP / (TP + FP) is 0 / 0
    assert classification_metrics(labels, np.eye(3)[never_ad], NAMES)["precision"] == pytest.approx((4 / 6 + 3 / 6) / 3)
    with pytest.raises(ValueError, match="for 2 classes"):      # a third column would be counted as no class
        classification_metrics(labels[labels < 2], np.eye(3)[pred][labels < 2], ("CN", "AD"))
    r = regression_metrics([50, 60, 70, 80], [52, 57, 70, 84], [0, 1, 0, 1])
    assert (r["mae"], r["mae_male"], r["mae_female"]) == pytest.approx((2.25, 1.0, 3.5))


def test_the_nll_reads_probabilities_off_one_by_float32s_rounding_as_probabilities_without_a_warning():
    rng = np.random.default_rng(0)
    probs, labels = rng.dirichlet([1, 1, 1], 40) * (1 + 3e-7), rng.integers(0, 3, 40)   # an averaged float32 row
    with warnings.catch_warnings():
        warnings.simplefilter("error")                          # scikit-learn warns of rows that do not sum to one
        nll = metrics.calibration_metrics(labels, probs)["nll"]
    assert nll == pytest.approx(-np.log(probs[np.arange(40), labels] / probs.sum(1)).mean(), rel=1e-12)


def test_the_auc_is_the_macro_mean_of_the_one_vs_rest_aucs_not_weighted_micro_nor_one_vs_one():
    # binary: of the 4 (negative, positive) pairs, 3 rank the positive higher
    m = classification_metrics([0, 0, 1, 1], [[0.9, 0.1], [0.6, 0.4], [0.65, 0.35], [0.2, 0.8]], ["CN", "AD"])
    assert m["auc_macro"] == pytest.approx(0.75)
    labels = np.array([0, 0, 1, 1, 1, 2])                  # classes of 2, 3 and 1 subjects
    probs = np.array([[.6, .3, .1], [.3, .5, .2], [.5, .4, .1], [.2, .7, .1], [.3, .3, .4], [.2, .2, .6]])
    per_class = [13 / 16, 6.5 / 9, 1.0]                    # one vs rest by pair counting (a tie counts half)
    macro = np.mean(per_class)                             # 0.8449
    assert classification_metrics(labels, probs, NAMES)["auc_macro"] == pytest.approx(macro, abs=1e-12)
    weighted = np.dot(per_class, np.bincount(labels) / len(labels))                      # 0.7986
    one_vs_one = roc_auc_score(labels, probs, multi_class="ovo", average="macro")       # 0.8889
    micro = roc_auc_score(np.eye(3)[labels].ravel(), probs.ravel())                      # 0.8542
    assert min(abs(other - macro) for other in (weighted, one_vs_one, micro)) > 5e-3


def test_eq9_averages_the_recalls_of_the_classes_present_when_a_class_has_no_subjects():
    """A set without AD subjects (new patients given to predict.py): BA over CN and MCI; AD's TP rate, AUC undefined."""
    labels, pred = np.array([0, 0, 0, 1, 1]), np.array([0, 1, 0, 1, 2])
    m = classification_metrics(labels, np.eye(3)[pred] * 0.8 + 0.2 / 3, NAMES)
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert math.isnan(m["tp_rate"]["AD"]) and math.isnan(m["auc_macro"])


def test_a_run_named_twice_is_one_member_and_a_runs_metrics_file_is_not_called_a_corrupt_checkpoint(tmp_path):
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 3, 20)
    runs = [fake_ad_run(tmp_path / "runs", "tabular", 0, 0, f, random_probs(rng, 20), labels) for f in range(4)]
    for r in runs:
        evaluate.save_logits(r, (rng.normal(0, 1, (20, 3)), labels), (rng.normal(0, 1, (20, 3)), labels))
    os.symlink(runs[1], tmp_path / "link")
    named = [os.path.dirname(runs[0]), runs[2], tmp_path / "link", os.path.join(runs[3], "best.pt")]
    assert [m.dir for m in predict.find_runs(named)] == runs
    os.makedirs(tmp_path / "chosen")                                       # a folder of links to the runs chosen
    os.symlink(runs[2], tmp_path / "chosen" / "fold2")
    os.symlink(tmp_path / "chosen", tmp_path / "chosen" / "loop")         # and a loop of links: walked once
    assert [m.dir for m in predict.find_runs([tmp_path / "chosen"])] == [str(tmp_path / "chosen" / "fold2")]
    res = evaluate.main(["calibrate", *map(str, named), "--quiet"])
    assert len(res["runs"]) == 4 and len(res["ensembles"]) == 1
    for proc in (run_main(predict.main, os.path.join(runs[0], "metrics.json"), "--data-csv", tmp_path / "new.csv",
                          "--out", tmp_path / "p.csv"),
                 run_main(evaluate.main, "sweep", os.path.join(runs[0], "metrics.json"), "--attribute", "ABETA",
                          "--values", "200")):             # not 'corrupt ... delete it to start the run afresh'
        assert_clean_error(proc, "metrics.json", runs[0], "give that run folder")
        assert "corrupt" not in proc.stderr


# ----------------------------------------------------------------------------------------------
# Sec. 3.5, Tables 5-6, Fig. 2-3: the networks
# Each network has Table 5-6's parameters and computes Fig. 2-3's layers in order, with their dropout rates and BN
# momenta.


# Tables 5-6, Fig. 2-3 written out as plain functional calls: order of conv / activation / pool / BN / dropout, each
# dropout rate in its place, each BN's momentum, what is concatenated where. Run in training mode from one RNG seed,
# model and reference draw the same dropout masks only when every rate and place agree; the running statistics the
# reference's BN calls leave (with the momenta written here) must equal the model's. Then in eval mode: the running
# statistics, no dropout.
def _bn(x, norm, momentum):
    return F.batch_norm(x, norm.running_mean, norm.running_var, norm.weight, norm.bias, norm.training, momentum,
                        norm.eps)


def _hyper_weights(layer, e):
    """Sec. 3.1: W = G_w e + c_w, b = G_b e + c_b, per sample."""
    g, gb = layer.hypernet.weights_gen, layer.hypernet.bias_gen
    return (e @ g.weight.T + g.bias).view(-1, *layer.weight_shape), e @ gb.weight.T + gb.bias


def _brain_age_by_hand(net, name, image, sex):
    x = image
    for i in (1, 2, 3):                               # Conv ReLU Conv ReLU MaxPool BN (Fig. 2), BN momentum 0.1
        a, b = getattr(net, f"conv{i}_a"), getattr(net, f"conv{i}_b")
        x = F.relu(F.conv3d(F.relu(F.conv3d(x, a.weight, a.bias)), b.weight, b.bias))
        x = _bn(F.max_pool3d(x, 2), getattr(net, f"batchnorm{i}"), 0.1)
    x = F.dropout3d(x, 0.2, net.training).flatten(1)          # Dropout3d(0.2), then flatten
    for n in ("linear1", "linear2", "linear3", "final_layer"):
        layer = getattr(net, n)
        if name == "hyperfusion":                     # its own embedding Linear(2, k) of the sex vector
            emb = layer.hypernet.embedding
            w, b = _hyper_weights(layer, sex @ emb.weight.T + emb.bias)
            x = torch.einsum("boi,bi->bo", w, x) + b
        else:                                         # concat: the sex vector at the input of every linear
            x = F.linear(torch.cat([x, sex], 1) if name == "concat" else x, layer.weight, layer.bias)
        x = F.relu(x) if n != "final_layer" else x
    return x.squeeze(1)


def _conv_by_hand(conv, x, e, stride, padding):
    if isinstance(conv, HyperConv):                   # per-sample generated kernel and bias
        w, b = _hyper_weights(conv, e)
        return torch.cat([F.conv3d(x[i:i + 1], w[i], b[i], stride, padding) for i in range(len(x))])
    return F.conv3d(x, conv.weight, conv.bias, stride, padding)


def _ad_block_by_hand(block, x, tabular, stride, rate, name):
    """PreactResBlock: BN ReLU Dropout3d Conv3d(3, stride) BN ReLU Dropout3d Conv3d(3) + shortcut, BN momentum
    0.05; the shortcut BN Conv3d(1x1, stride), in the HyperRes block HyperConv3d(1x1, stride) BN."""
    def embed():                                      # Linear BatchNorm1d(8) PReLU, one call per hyperlayer
        lin, norm, prelu = block.conv1.hypernet.embedding if isinstance(block.conv1, HyperConv) else \
            block.downsample.hypernet.embedding
        return F.prelu(_bn(F.linear(tabular, lin.weight, lin.bias), norm, 0.1), prelu.weight)
    h = x
    if name in ("film", "daft"):                      # scale * F + shift on the residual branch, no activation
        z = tabular if name == "film" else torch.cat([x.mean((2, 3, 4)), tabular], 1)      # DAFT: pooled F too
        scale, shift = (F.relu(z @ block.aux[0].weight.T) @ block.aux[2].weight.T)[:, :, None, None, None].chunk(2, 1)
        assert (scale < 0).any() and (shift.abs() > 0.1).any()                         # a real modulation
        h = scale * x + shift
    e1 = embed() if isinstance(block.conv1, HyperConv) else None
    h = _conv_by_hand(block.conv1, F.dropout3d(F.relu(_bn(h, block.bn1, 0.05)), rate, block.training), e1,
                      stride, 1)
    e2 = embed() if isinstance(block.conv2, HyperConv) else None
    h = _conv_by_hand(block.conv2, F.dropout3d(F.relu(_bn(h, block.bn2, 0.05)), rate, block.training), e2, 1, 1)
    if isinstance(block.downsample, HyperConv):       # the shortcut reads the original (unmodulated) map
        return h + _bn(_conv_by_hand(block.downsample, x, embed(), stride, 0), block.downsample_bn, 0.05)
    if block.downsample is None:
        return h + x
    norm, conv = block.downsample
    return h + F.conv3d(_bn(x, norm, 0.05), conv.weight, conv.bias, stride)


def _ad_by_hand(net, name, image, tabular):
    if name == "tabular":                             # Linear(n_tab, 8) BatchNorm1d(8) PReLU Linear(8, 3), Fig. 3C
        lin, norm, prelu = net.embedding
        e = F.prelu(_bn(F.linear(tabular, lin.weight, lin.bias), norm, 0.1), prelu.weight)
        return F.linear(e, net.head.weight, net.head.bias)
    c = net.conv_bn_relu[0]                           # Conv3d(1, f, 3, pad 1) BN(0.05) ReLU, MaxPool3d(2)
    x = F.max_pool3d(F.relu(_bn(F.conv3d(image, c.weight, c.bias, 1, 1), net.conv_bn_relu[1], 0.05)), 2)
    for i, stride, rate in ((1, 1, 0.1), (2, 2, 0.2), (3, 2, 0.2), (4, 2, 0.3)):
        x = _ad_block_by_hand(getattr(net, f"block{i}"), x, tabular, stride, rate, name if i == 4 else "imaging")
    x = F.dropout(F.adaptive_avg_pool3d(x, 1).flatten(1), 0.6, net.training)             # Dropout(0.6)
    if name == "concat":                              # the tabular vector next to the pooled image features
        x = torch.cat([x, tabular], 1)
    x = F.relu(F.linear(x, net.fc1.weight, net.fc1.bias))                              # fc1 ReLU
    return F.linear(F.dropout(x, 0.5, net.training), net.fc2.weight, net.fc2.bias)  # Dropout(0.5) fc2


# every model of each task; HyperFusion also with another embedding size and hyperlayers (App. D)
MODEL_CASES = [("brain-age", name, dict(image_shape=BRAIN_AGE_SMALL)) for name in BRAIN_AGE_MODELS] + [
    ("brain-age", "hyperfusion", dict(image_shape=BRAIN_AGE_SMALL, embedding_dim=2))] + [
    ("ad", name, dict(n_tabular=5, f=4)) for name in AD_MODELS] + [
    ("ad", "hyperfusion", dict(n_tabular=5, f=4, hyperlayers=hyperlayers)) for hyperlayers in
    [("conv1", "conv2", "downsample"), ("conv1",)]]


def _model_inputs(task, batch=4):
    g = torch.Generator().manual_seed(1)
    if task == "brain-age":
        return torch.randn(batch, 1, *BRAIN_AGE_SMALL, generator=g), torch.eye(2)[[0, 1, 1, 0, 1][:batch]]
    return torch.randn(batch, 1, *AD_SMALL, generator=g), torch.randn(batch, 5, generator=g)


TABLE_5 = {"conv1_a": 448, "conv1_b": 6928, "batchnorm1": 32, "conv2_a": 13856, "conv2_b": 27680, "batchnorm2": 64,
           "conv3_a": 55360, "conv3_b": 110656, "batchnorm3": 128, "dropout1": 0, "linear1": 1261603, "linear2": 1091,
           "linear3": 4227, "final_layer": 133}
TABLE_6 = {"conv_bn_relu": 480, "max_pool3d_1": 0, "block1": 42208, "block2": 168384, "block3": 672640,
           "block4": 2953216 + 145, "adaptive_avg_pool3d": 0, "linear_drop1": 0, "fc1": 16448, "linear_drop2": 0,
           "fc2": 195}


@pytest.mark.parametrize("task,options,table,total,imaging", [
    ("brain-age", {}, TABLE_5, 1482206, 848673),
    ("brain-age", dict(embedding_dim=2), dict(TABLE_5, **{n: 6 + 3 * i * o + 3 * o for n, i, o in [  # 2->2 embeddings
        ("linear1", 39424, 16), ("linear2", 16, 32), ("linear3", 32, 64), ("final_layer", 64, 1)]}), 2115739, 848673),
    ("ad", dict(n_tabular=15), TABLE_6, 3853716, 3589123)])
def test_parameter_counts_equal_tables_5_and_6(task, options, table, total, imaging):
    model = build_model(task, "hyperfusion", **options)
    assert {n: count_parameters(m) for n, m in model.named_children()} == table
    assert count_parameters(model) == total and count_parameters(build_model(task, "imaging", **options)) == imaging
    if task == "brain-age":
        assert model.flat_features == 39424
    else:                                             # the embedding Linear(15, 8) BatchNorm1d(8) PReLU, then the MLP
        assert count_parameters(model.embedding) == 145
        assert count_parameters(build_model("ad", "tabular", n_tabular=15)) == 15 * 8 + 8 + 16 + 1 + 8 * 3 + 3


@pytest.mark.parametrize("task,name,options", MODEL_CASES)
def test_tables_5_6_each_network_computes_its_layers_in_the_papers_order_with_its_dropout_rates_and_bn_momenta(
        task, name, options):
    """Also: the hyperlayers named, the tabular model's embedding loaded, a gradient for every parameter."""
    net = _randomise(build_model(task, name, **options)).to("cpu").train()    # .to() walks every submodule
    if "hyperlayers" in options:
        assert {n for n, m in net.block4.named_children() if isinstance(m, HyperConv)} == set(options["hyperlayers"])
    if task == "ad" and name == "hyperfusion":
        tabular_model = _randomise(build_model("ad", "tabular", n_tabular=5), seed=3)
        net.load_embedding(tabular_model)
        assert all(torch.equal(a, b) for a, b in zip(net.embedding.state_dict().values(),
                                                     tabular_model.embedding.state_dict().values()))
    by_hand = copy.deepcopy(net)                      # its running statistics are updated by the calls above
    image, tab = _model_inputs(task)
    torch.manual_seed(7)
    out = net(image, tab)
    torch.manual_seed(7)
    reference = _brain_age_by_hand if task == "brain-age" else _ad_by_hand
    with torch.no_grad():
        torch.testing.assert_close(out, reference(by_hand, name, image, tab))
    for (k, v), (k2, v2) in zip(net.state_dict().items(), by_hand.state_dict().items()):     # BN momenta
        assert k == k2 and (k.endswith("num_batches_tracked") or torch.allclose(v, v2, rtol=1e-5, atol=1e-6)), k
    out.square().sum().backward()
    assert [n for n, p in net.named_parameters() if p.grad is None] == []
    with torch.no_grad():                             # eval: the same layers on the running statistics, no dropout
        torch.testing.assert_close(net.eval()(image, tab), reference(by_hand.eval(), name, image, tab))


@pytest.mark.parametrize("task,name,options", MODEL_CASES)
def test_in_eval_mode_a_batch_equals_its_samples_one_at_a_time(task, name, options):
    model = _randomise(build_model(task, name, **options)).eval()
    for m in model.modules():  # random but valid running statistics
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_var.uniform_(0.5, 2.0)
    image, tabular = _model_inputs(task, batch=3)
    with torch.no_grad():
        batched = model(image, tabular)
        single = torch.cat([model(image[b:b + 1], tabular[b:b + 1]) for b in range(3)])
    torch.testing.assert_close(batched, single, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", AD_MODELS)
def test_app_b_every_ad_network_of_cn_vs_ad_ends_in_two_outputs(name):
    """--classes 2 (App. B): two logits, from the tabular MLP's Linear(8, 2) as from the image networks' fc2."""
    image, tabular = _model_inputs("ad", batch=2)
    with torch.no_grad():
        assert build_model("ad", name, n_tabular=5, n_classes=2, f=4).eval()(image, tabular).shape == (2, 2)


# ----------------------------------------------------------------------------------------------
# Sec. 4.2: brain age, Fig. 4
# The 80/10/10 split by sex and age, the centred target, precise BN, the age-bias correction fitted on validation,
# the 5-best ensemble, Fig. 4A's training sets, the sex sweep.


def test_brain_age_split_cuts_every_sex_and_age_stratum_80_10_10_by_its_seed_and_the_demo_keeps_200_and_200():
    rng = np.random.default_rng(0)
    age, sex = rng.uniform(8, 90, 2000), rng.integers(0, 2, 2000)
    strata = _strata(sex, _age_bins(age))
    assert len(np.unique(strata)) == 40
    for seed in range(3):
        parts = data.brain_age_split(age, sex, seed)
        assert [len(p) for p in parts] == [1600, 200, 200] and sorted(np.concatenate(parts)) == list(range(2000))
        for g in np.unique(strata):
            members = np.flatnonzero(strata == g)
            for part, share in zip(parts, (0.8, 0.1, 0.1)):
                assert abs(np.isin(members, part).sum() - share * len(members)) <= 1 + 1e-9, (seed, g)
    again, other = data.brain_age_split(age, sex, 2, (.8, .1, .1)), data.brain_age_split(age, sex, 3)
    assert all(np.array_equal(p, q) for p, q in zip(parts, again)) and not np.array_equal(parts[2], other[2])
    demo = data.brain_age_split(age[:800], sex[:800], seed=0, fractions=train_brain_age.DEMO_SPLIT)
    assert [len(p) for p in demo] == [400, 200, 200]


def test_the_brain_age_target_is_centred_on_the_mean_age_of_the_training_rows_it_trains_on(fig4a_women_run):
    table, (train, val, test), _, run_dir = fig4a_women_run
    women = train_brain_age.select_training_sex(train, table.sex, "F", 0)
    centre = load_run(run_dir).target.centre
    assert centre == float(table.age[women].mean())
    for other in (train, np.concatenate([women, val]), np.arange(len(table.age))):   # would move it
        assert abs(float(table.age[other].mean()) - centre) > 0.1


@pytest.mark.parametrize("task,table_1", [("ad", dict(epochs=250, batch_size=32, lr=1e-4, weight_decay=1e-5)),
                                           ("brain-age", dict(epochs=70, batch_size=64, lr=1.5e-4, weight_decay=0.05))])
def test_real_data_trains_on_table_1s_schedule_and_an_option_overrides_one_number_of_it(task, table_1, tmp_path):
    parse = train_ad.ad_arguments if task == "ad" else train_brain_age.brain_age_arguments
    for extra, want in (([], table_1), (["--epochs", "3"], dict(table_1, epochs=3))):
        args = vars(parse().parse_args(["--data-csv", str(tmp_path / "real.csv"), "--quiet", *extra]))
        fields = training.common_run_fields(args, torch.device("cpu"), task, {}, {**table_1, "lr_schedule": "constant"})
        assert {k: fields[k] for k in table_1} == want and fields["data_csv"] == str(tmp_path / "real.csv")
    real = train_ad.REAL_AD if task == "ad" else train_brain_age.REAL_BRAIN_AGE      # what the scripts pass
    assert real == {**table_1, "lr_schedule": "constant"}


def test_the_brain_age_demo_anneals_its_learning_rate_by_a_cosine_and_real_data_keeps_table_1s_constant_rate(
        brain_age_run, brain_age_cohort20, tmp_path, monkeypatch):
    _, real = brain_age_run
    assert load_run(real).run.lr_schedule == "constant"
    with open(os.path.join(real, "log.csv")) as f:
        assert [float(r["lr"]) for r in csv.DictReader(f)] == [1.5e-4] * 2
    monkeypatch.setattr(training, "builtin_cohort", lambda task, data_dir, quiet: str(brain_age_cohort20))
    train_brain_age.main(["--out", str(tmp_path), "--epochs", "3", "--batch-size", "8", "--model", "imaging",
                          "--quiet"])
    run_dir = training.brain_age_run_dir(tmp_path, "imaging", 0)
    assert load_run(run_dir).run.lr_schedule == "cosine"
    with open(os.path.join(run_dir, "log.csv")) as f:
        lrs = [float(r["lr"]) for r in csv.DictReader(f)]
    assert lrs == pytest.approx([1e-3 * 0.5 * (1 + math.cos(math.pi * e / 3)) for e in range(3)], rel=1e-12)


def test_precise_bn_re_estimates_the_running_statistics_from_the_training_batches_alone():
    class Net(_TabularNet):
        def __init__(self):
            super().__init__()
            self.norm = nn.BatchNorm1d(2, momentum=0.05)

        def forward(self, image, tabular):
            return self.norm(self.linear(tabular))

    torch.manual_seed(0)
    net = Net().eval()
    net.norm.running_mean.fill_(99.0)                                        # stale statistics, as after an epoch
    net.norm.running_var.fill_(50.0)
    net.norm.num_batches_tracked.fill_(1000)
    xs = [torch.randn(8, 3) * 2 + 1 for _ in range(3)]
    weights = {k: v.clone() for k, v in net.state_dict().items() if "running" not in k and "num_batches" not in k}
    training.recalibrate_batchnorm(net, [(torch.zeros(8, 0), x, torch.zeros(8)) for x in xs], torch.device("cpu"))
    with torch.no_grad():
        h = [net.linear(x) for x in xs]
    torch.testing.assert_close(net.norm.running_mean, torch.stack([v.mean(0) for v in h]).mean(0))
    torch.testing.assert_close(net.norm.running_var, torch.stack([v.var(0) for v in h]).mean(0))
    assert net.norm.momentum == 0.05 and not net.training                   # left as it was found
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in weights.items())


def test_brain_age_training_re_estimates_batch_norm_before_every_validation_from_its_chosen_training_rows_in_order(
        brain_age_cohort20, tmp_path, monkeypatch):
    """Each epoch, over the training subjects of the chosen sex, each once, in order (not validation, not shuffled)."""
    seen, split = [], (0.5, 0.25, 0.25)

    def spy(model, loader, device, precision):
        seen.append(torch.cat([age for _, _, age in loader]).numpy())
        return training.recalibrate_batchnorm(model, loader, device, precision)

    monkeypatch.setattr(train_brain_age, "recalibrate_batchnorm", spy)
    train_brain_age.main(_ba_args(brain_age_cohort20, tmp_path, "--epochs", "2", "--batch-size", "4", "--model",
                                  "imaging", "--train-sex", "F", "--split", *map(str, split)))
    table = data.read_brain_age_table(str(brain_age_cohort20), None)
    train = data.brain_age_split(table.age, table.sex, 0, split)[0]
    women = train_brain_age.select_training_sex(train, table.sex, "F", 0)
    assert len(seen) == 2 and len(women) < len(train)
    for ages in seen:
        np.testing.assert_array_equal(ages, table.age[women].astype(np.float32))


def test_the_age_bias_correction_leaves_a_gap_uncorrelated_with_age_on_its_fitting_set():
    age = np.array([20.0, 30.0, 40.0, 50.0, 60.0, 70.0])
    pred = np.array([30.0, 36.0, 43.0, 50.0, 56.0, 61.0])  # regression to the mean: young over-, old under-estimated
    gap = pred - age
    slope = ((age - age.mean()) * (gap - gap.mean())).sum() / ((age - age.mean()) ** 2).sum()   # by hand
    fit = metrics.age_bias_fit(age, pred)
    assert fit["slope"] == pytest.approx(slope) and fit["intercept"] == pytest.approx(gap.mean() - slope * age.mean())
    corrected = metrics.corrected_gap(age, pred, fit)
    assert abs(np.corrcoef(corrected, age)[0, 1]) < 1e-9 and abs(corrected.mean()) < 1e-9
    for ages, preds in (([50.0], [53.0]), ([50.0, 50.0], [52.0, 54.0])):     # no age spread: no slope to fit
        assert metrics.age_bias_fit(ages, preds) == {"intercept": 3.0, "slope": 0.0, "n": len(ages)}
        assert np.isnan(metrics.gap_summary(ages, preds, [0] * len(ages), fit)["r_gap_age"])   # nor r, not 0
    summary = metrics.gap_summary(age, pred, np.array([0, 1, 0, 1, 0, 1]), fit)
    assert summary["r_gap_age"] < -0.99 and abs(summary["r_corrected_gap_age"]) < 1e-9
    assert summary["gap_male"] == pytest.approx(np.mean(gap[[0, 2, 4]]))


def test_the_age_bias_of_the_brain_age_gap_is_fitted_on_the_validation_rows_never_the_test_rows(fig4a_women_run):
    table, (train, val, test), _, run_dir = fig4a_women_run
    finished_run = load_run(run_dir)
    saved, bias = finished_run.read_predictions(), finished_run.read_metrics()["age_bias"]
    assert list(saved["val_subjects"]) == [table.subjects[i] for i in val]
    assert bias == metrics.age_bias_fit(table.age[val], saved["val_pred"])
    on_test = metrics.age_bias_fit(saved["age"], saved["pred"])
    assert max(abs(on_test[k] - bias[k]) for k in ("slope", "intercept")) > 1e-3        # the test rows would show
    gap = finished_run.read_metrics()["test"]["gap"]
    assert gap == metrics.gap_summary(saved["age"], saved["pred"], saved["sex"], bias)


def test_brain_age_ensembles_the_five_versions_with_the_lowest_validation_mae(tmp_path):
    rng = np.random.default_rng(3)
    age, sex, val_age = rng.uniform(20, 80, 30), np.arange(30) % 2, rng.uniform(20, 80, 12)
    preds = {v: age + rng.normal(0, 3, 30) for v in range(7)}
    val_preds = {v: 0.7 * val_age + 15 + rng.normal(0, 2, 12) for v in range(7)}     # regression to the mean
    for v, mae in enumerate([5.0, 1.0, 6.0, 2.0, 3.0, 7.0, 4.0]):
        fake_brain_age_run(tmp_path, v, mae, preds[v], age, sex, val=(val_age, val_preds[v]))
    for train_sex in ("M", "F"):
        fake_brain_age_run(tmp_path, 0, 1.0, age + 2, age, sex, train_sex=train_sex)
    v1 = training.brain_age_run_dir(tmp_path, "hyperfusion", 1)
    shutil.copytree(v1, v1 + ".bak")                                      # a copy beside the versions: not one
    os.makedirs(training.brain_age_run_dir(tmp_path, "hyperfusion", 7))    # a version still training: said
    open(os.path.join(training.brain_age_run_dir(tmp_path, "hyperfusion", 7), "last.pt"), "wb").close()
    res = evaluate.evaluate_brain_age(str(tmp_path), quiet=True)
    hf = next(m for m in res["models"] if m["folder"] == "hyperfusion")
    chosen = (1, 3, 4, 6, 0)                                              # val MAE 1, 2, 3, 4, 5
    assert hf["versions"] == list(chosen)
    ensemble = np.mean([preds[v] for v in chosen], 0)
    assert hf["metrics"] == pytest.approx(regression_metrics(age, ensemble, sex))   # Eq. 6
    # the gap is corrected with the fit of the same ensemble's validation predictions
    f32 = lambda p: np.mean([p[v].astype(np.float32) for v in chosen], 0)
    gap = metrics.gap_summary(age.astype(np.float32), f32(preds), sex, metrics.age_bias_fit(val_age.astype(np.float32),
                                                                                           f32(val_preds)))
    assert hf["gap"] == pytest.approx(gap, abs=1e-4)
    assert [r["train"] for r in res["fig4a"]] == ["M", "F"]
    assert [(r["male"], r["female"], r["all"]) for r in res["fig4a"]] == [pytest.approx((2, 2, 2), abs=1e-4)] * 2
    md = (tmp_path / "results_brain-age.md").read_text()
    assert "Fig. 4A" in md and "1, 3, 4, 6, 0 of 7" in md and "Brain-age gap" in md
    assert res["unfinished"] == ["hyperfusion v7"] and "Left out (not finished): hyperfusion v7" in md
    # Sec. 4.2.2's "5 best" is a choice only among more than five: the folders with fewer are named as all kept
    assert "All versions kept, none chosen by validation MAE (no more than 5 exist): hyperfusion-trainF, " \
           "hyperfusion-trainM." in md
    assert hf["version_mae"] == {v: pytest.approx(np.abs(preds[v] - age).mean(), abs=1e-4) for v in range(7)}
    paired = np.abs(age + 2 - age) - np.abs(ensemble - age)                          # the same scans
    vs = next(m for m in res["models"] if m["folder"] == "hyperfusion-trainM")["vs_hyperfusion"]
    assert vs["mean"] == pytest.approx(paired.mean(), abs=1e-4)
    assert vs["se"] == pytest.approx(paired.std(ddof=1) / np.sqrt(30), abs=1e-4)
    fake_brain_age_run(tmp_path, 0, 1.0, age + 2, age, sex, model="imaging", names="CV")     # other test scans
    res = evaluate.evaluate_brain_age(str(tmp_path), quiet=True)
    assert next(m for m in res["models"] if m["folder"] == "imaging")["vs_hyperfusion"] is None   # never paired


def test_brain_age_versions_whose_validation_subjects_differ_are_refused_in_one_line(tmp_path):
    """The gap's age bias is fitted on the versions' validation predictions averaged row by row."""
    rng = np.random.default_rng(2)
    age, sex, val_age = rng.uniform(20, 80, 12), np.arange(12) % 2, rng.uniform(20, 80, 6)
    for v, names in ((0, "BV"), (1, "BW")):
        fake_brain_age_run(tmp_path, v, 1.0 + v, age + 1, age, sex, val=(val_age, val_age + 2), names=names)
    assert_clean_error(run_main(evaluate.main, "brain-age", "--runs", tmp_path), "cannot ensemble", "v0", "v1",
                       "their validation subjects differ")


def test_fig4a_training_sets_are_one_size_min_men_women_drawn_with_the_seed_and_the_mix_is_half_and_half():
    idx = np.arange(100, 151)                             # training-split indices into the table
    for men in (30, 21):                                  # whichever sex is the larger
        full = np.r_[np.zeros(100, int), np.zeros(men, int), np.ones(51 - men, int)]
        sets = {s: train_brain_age.select_training_sex(idx, full, s, 0) for s in ("M", "F", "mixed")}
        assert {s: len(v) for s, v in sets.items()} == {"M": 21, "F": 21, "mixed": 21}
        assert set(full[sets["M"]]) == {0} and set(full[sets["F"]]) == {1}
        assert np.bincount(full[sets["mixed"]], minlength=2).tolist() == [11, 10]       # ceil(n/2) men
        assert all(set(v) <= set(idx) and len(set(v)) == len(v) for v in sets.values())
        larger = "M" if men > 21 else "F"                 # the larger sex's set is a draw, made with the seed
        again = train_brain_age.select_training_sex(idx, full, larger, 0)
        other = train_brain_age.select_training_sex(idx, full, larger, 1)
        assert np.array_equal(again, sets[larger]) and not np.array_equal(other, sets[larger])
        assert np.array_equal(train_brain_age.select_training_sex(idx, full, "all", 0), idx)


def test_fig4a_training_sets_are_drawn_from_the_training_split_alone(fig4a_women_run):
    table, (train, val, test), (given, _), _ = fig4a_women_run
    assert len(given) == 1 and np.array_equal(given[0], train)
    assert (table.sex[val] == 1).any() or (table.sex[test] == 1).any()     # women the wrong rows would add


def test_embedding_dim_2_trains_the_two_to_two_sex_embedding_of_the_ablation_in_its_own_folder(brain_age_cohort20,
                                                                                                 tmp_path, monkeypatch):
    """Sec. 4.2.5's ablation: `--embedding-dim 2` gives every hyperlayer a Linear(2, 2) sex embedding."""
    seen = []

    def fit(model, loader, loss_fn, validate, score_key, run, run_dir, *args, **kwargs):
        seen.append((model, run_dir))
        raise _Stop

    monkeypatch.setattr(train_brain_age, "fit", fit)
    with pytest.raises(_Stop):
        train_brain_age.main(_ba_args(brain_age_cohort20, tmp_path, "--embedding-dim", "2"))
    (model, run_dir), = seen
    embeddings = [m.hypernet.embedding for m in model.modules() if isinstance(m, HyperLinear)]
    assert len(embeddings) == 4 and all(e.weight.shape == (2, 2) for e in embeddings)
    assert run_dir == os.path.join(tmp_path, "brain-age", "hyperfusion-emb2", "v0")


def _sweep_checkpoint(path, name, cohort, cache):
    """A brain-age checkpoint of `name` on `cohort`; HyperFusion's sexes embedded far apart, as after training."""
    torch.manual_seed(0)
    shape = synthetic.BRAIN_AGE_SYNTH["shape"]
    model = build_model("brain-age", name, image_shape=shape)
    if name == "hyperfusion":
        for layer in model.linears:
            getattr(model, layer).hypernet.embedding.weight.data = torch.tensor([[1.0, 2.0]])
        init_hyperlayers(model, torch.eye(2)[torch.arange(10) % 2])
    run = RunConfig(task="brain-age", model=name, version=0, split_seed=0, embedding_dim=1, train_sex="all",
                    data_csv=str(cohort), cache_dir=str(cache), **SCHEDULE)
    training.save_checkpoint({"model": model.state_dict(), "run": dataclasses.asdict(run), "epoch": 0,
                              "inputs": {"n_tabular": 2, "image_shape": list(shape)},
                              "target": {"centre": 50.0, "scale": 10.0}}, path)
    return str(path)


def test_brain_age_sweep_reads_every_test_scan_as_male_and_as_female_and_an_absent_sex_has_no_mean(
        brain_age_cohort20, tmp_path):
    hf, im = (evaluate.main(["sweep", _sweep_checkpoint(tmp_path / f"{name}.pt", name, brain_age_cohort20, tmp_path /
                                                       "cache"), "--attribute", "Sex", "--values", "M", "F"])["summary"]
              for name in ("hyperfusion", "imaging"))
    assert [s["value"] for s in hf] == [None, "M", "F"]
    assert hf[2]["mean_pred"] != pytest.approx(hf[1]["mean_pred"], abs=1e-4)      # sex changes the reading
    assert im[2]["mean_pred"] == pytest.approx(im[1]["mean_pred"], abs=1e-4)      # the image-only model ignores it
    assert hf[0]["change_vs_first"] is None and hf[1]["change_vs_first"] == 0.0     # per scan, against the first value
    assert hf[2]["change_vs_first"] == pytest.approx(hf[2]["mean_pred"] - hf[1]["mean_pred"], abs=1e-4)
    run = load_run(tmp_path / "hyperfusion.pt")                     # the true males' and true females' means
    _, table, idx, images = predict.test_set(run)
    pred, _ = predict.run_outputs(run, run.model(), images, table.sex[idx], table.age[idx], torch.device("cpu"), 16,
                                  run.target.decode)
    assert set(table.sex[idx]) == {0, 1} and [hf[0]["mean_pred_male"], hf[0]["mean_pred_female"]] == pytest.approx(
        [pred[table.sex[idx] == 0].mean(), pred[table.sex[idx] == 1].mean()], abs=1e-4)
    as_male, _ = predict.run_outputs(run, run.model(), images, np.zeros(len(idx), np.int64), table.age[idx],
                                     torch.device("cpu"), 16, run.target.decode)
    assert hf[1]["mean_pred"] == pytest.approx(as_male.mean(), abs=1e-4)           # M: every test scan read as male
    assert (tmp_path / "sweep_Sex.md").is_file()
    men = _edit_table(brain_age_cohort20, tmp_path / "men.csv",                     # test scans of one sex alone
                      lambda k, c: [c[0], c[1], "M", os.path.join(os.path.dirname(brain_age_cohort20), c[3])])
    alone = evaluate.main(["sweep", _sweep_checkpoint(tmp_path / "men.pt", "imaging", men, tmp_path / "cache"),
                           "--attribute", "Sex", "--values", "F"])["summary"][0]
    assert math.isnan(alone["mean_pred_female"]) and np.isfinite(alone["mean_pred_male"])   # no woman: no mean


def test_brain_age_plots_draw_the_scatters_fig4a_and_fig4b_or_say_which_is_skipped(tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    rng = np.random.default_rng(5)
    age, sex, val_age = rng.uniform(20, 80, 24), np.arange(24) % 2, rng.uniform(20, 80, 10)
    full, partial, alone = tmp_path / "full", tmp_path / "partial", tmp_path / "alone"
    for v in range(2):
        for runs in (full, partial, alone):
            fake_brain_age_run(runs, v, 2.0 + v, age + rng.normal(0, 3, 24), age, sex,
                               val=(val_age, 0.7 * val_age + 15 + rng.normal(0, 1, 10)))
        fake_brain_age_run(full, v, 3.0, age + rng.normal(1, 4, 24), age, sex, model="imaging")
    for train_sex, bias, where in (("M", 1.0, (full, partial)), ("F", -1.0, (full, partial)), ("mixed", 0.0, (full,))):
        for runs in where:
            fake_brain_age_run(runs, 0, 3.0, age + bias + rng.normal(0, 3, 24), age, sex, model="imaging",
                               train_sex=train_sex)
    texts, figures = _spy_on_figures(monkeypatch)
    res = evaluate.main(["brain-age", "--runs", str(full), "--plots", str(full / "figures")])
    printed = capsys.readouterr().out
    folders = ["hyperfusion", "imaging", "imaging-trainF", "imaging-trainM", "imaging-trainmixed"]
    expected = sorted([f"brain_age_scatter_{f}.png" for f in folders] + ["fig4a.png", "fig4b.png"])
    assert sorted(os.listdir(full / "figures")) == expected
    for name in expected:   # the ensembles with validation predictions get the corrected panel beside the first
        wide = name == "brain_age_scatter_hyperfusion.png"
        assert _png_size(full / "figures" / name) == _pixels(evaluate.WIDE if wide else evaluate.SMALL), name
        assert f"wrote {full / 'figures' / name}\n" in printed
    by = {m["folder"]: m for m in res["models"]}
    # the scatter's bias line is the one the code subtracts: the validation fit of the same Eq. 6 ensemble
    ens = evaluate.brain_age_ensemble({v: training.brain_age_run_dir(full, "hyperfusion", v) for v in (0, 1)})
    fit = ens["fit"]
    scatter = texts["brain_age_scatter_hyperfusion.png"]
    assert any(f"slope {fit['slope']:+.2f}" in t and "validation fit" in t for t in scatter)
    red = next(ln for ln in figures["brain_age_scatter_hyperfusion.png"].axes[0].lines if ln.get_color() == "tab:red")
    x, y = red.get_data()
    np.testing.assert_allclose(y, x + fit["intercept"] + fit["slope"] * x)
    assert f"r(gap, age) {by['hyperfusion']['gap']['r_corrected_gap_age']:+.2f}" in " ".join(scatter)
    dots = {c.get_label(): np.sort(c.get_offsets()[:, 0]) for c in
            figures["brain_age_scatter_hyperfusion.png"].axes[0].collections}                  # each sex's scans
    for code, name in ((0, "male"), (1, "female")):
        np.testing.assert_allclose(dots[name], np.sort(age[sex == code]))
    right = figures["brain_age_scatter_hyperfusion.png"].axes[1].collections     # the ages with the bias removed
    np.testing.assert_allclose(np.sort(np.concatenate([c.get_offsets()[:, 1] for c in right])),
                               np.sort(ens["age"] + metrics.corrected_gap(ens["age"], ens["pred"], fit)))
    # Fig. 4A and 4B draw the MAEs of the table, by test sex, in the paper's order of bars
    for name, in_order in (("fig4a.png", ["imaging-trainM", "imaging-trainF", "imaging-trainmixed"]),
                           ("fig4b.png", ["imaging", "hyperfusion"])):
        bars = [p.get_height() for p in figures[name].axes[0].patches]
        assert bars == pytest.approx([by[f]["metrics"][k] for f in in_order for k in ("mae_male", "mae_female", "mae")])
    assert "not trained: concatenation, HyperFusion (sex -> 2D)" in texts["fig4b.png"]
    # absent runs: not drawn, one line each saying why
    for runs, why in ((partial, ["skipped fig4a.png: Fig. 4A compares three training sets: no finished runs in "
                                 "imaging-trainmixed", "skipped fig4b.png: Fig. 4B compares image-only and "
                                 "HyperFusion: no finished runs in imaging"]),
                      (alone, ["skipped fig4a.png: no runs trained on one sex"])):
        evaluate.main(["brain-age", "--runs", str(runs), "--plots", str(runs / "figures")])
        printed = capsys.readouterr().out
        assert all(line in printed for line in why), printed
        assert not {"fig4a.png", "fig4b.png"} & set(os.listdir(runs / "figures"))
        assert "brain_age_scatter_hyperfusion.png" in os.listdir(runs / "figures")


def test_in_the_brain_age_cohort_mens_brains_age_faster_so_reading_the_image_without_sex_leaves_years_behind(
        monkeypatch):
    P = synthetic.BRAIN_AGE_SYNTH
    assert P["atrophy_after_40"]["M"] > P["atrophy_after_40"]["F"]                     # Coffey et al. 1998
    assert P["brain_age_gap_sd"]["M"] > P["brain_age_gap_sd"]["F"]                     # Sec. 4.2.6
    assert synthetic.brain_age_atrophy(75.0, True) > synthetic.brain_age_atrophy(75.0, False)
    anatomy = synthetic.brain_age_anatomy(np.random.default_rng(0), 600)
    age, male, oracle = anatomy["age"], anatomy["male"], synthetic.brain_age_oracle(anatomy)
    gap = anatomy["brain_age"] - age                                                    # drawn as the oracle reads it
    assert gap[male].std() == pytest.approx(3.5, rel=0.1) and gap[~male].std() == pytest.approx(3.0, rel=0.1)
    knowing = np.abs(np.where(male, oracle["as_male"], oracle["as_female"]) - age).mean()
    without = np.abs(oracle["without_sex"] - age).mean()
    misled = np.abs(np.where(male, oracle["as_female"], oracle["as_male"]) - age).mean()   # told the other sex
    assert knowing < without < misled
    assert without < min(np.abs(oracle[k] - age).mean() for k in ("as_male", "as_female"))   # sex integrated out
    assert knowing < 3.5                          # Sec. 2.3: healthy brains are read to within ~3 years
    few = {k: v[:20] for k, v in anatomy.items()}   # each reading weighs the cohort's ages (the prior): with the
    monkeypatch.setitem(P, "age_bump", (30, 8))     # bump moved, the same scans read otherwise
    moved = synthetic.brain_age_oracle(few)
    assert all(np.abs(moved[k] - oracle[k][:20]).max() > 1.0 for k in ("as_male", "as_female", "without_sex"))


def test_the_oracle_report_names_both_oracles_and_the_run_on_its_test_subjects(brain_age_cohort20, tmp_path):
    cohort = os.path.dirname(brain_age_cohort20)
    res = synthetic.oracle_report(cohort)
    assert set(res) == {"oracle knowing sex", "oracle without sex", "sweep"} and res["oracle knowing sex"]["n"] == 20
    assert res["sweep"]["female_minus_male"] > 1.0       # a scan read as a woman's is older: women's brains age slower
    table = data.read_brain_age_table(brain_age_cohort20)
    np.savez(tmp_path / "p.npz", subjects=np.array(table.subjects[:5]), pred=table.age[:5] + 1.0)
    res = synthetic.oracle_report(cohort, str(tmp_path / "p.npz"))
    assert res["the run"]["mae"] == pytest.approx(1.0) and res["oracle without sex"]["n"] == 5
    np.savez(tmp_path / "q.npz", subjects=np.array(["nobody"]), pred=np.zeros(1))
    assert_clean_error(run_main(synthetic.main, "oracle", "--cohort", cohort, "--predictions", tmp_path / "q.npz"),
                       "nobody")


def test_synthetic_brain_age_cohort_loads_back(brain_age_cohort20):
    t = data.read_brain_age_table(brain_age_cohort20)
    assert len(t.subjects) == 20 and t.age.dtype == np.float32 and set(t.sex.tolist()) <= {0, 1}
    assert 8 <= t.age.min() and t.age.max() <= 90
    shape = synthetic.BRAIN_AGE_SYNTH["shape"]
    cache = data.ImageCache(t.image_paths, os.path.join(os.path.dirname(brain_age_cohort20), "cache"),
                            expected_shape=shape)
    img, tab, y = data.BrainAgeDataset(cache, data.sex_onehot(t.sex), t.age)[0]
    assert img.shape == (1,) + shape and img.dtype == torch.float32
    assert tab.shape == (2,) and tab.sum() == 1 and y.dtype == torch.float32 and y.shape == ()
    brain = img[img != 0]
    assert abs(float(brain.mean())) < 1e-3 and abs(float(brain.std()) - 1) < 1e-2


@pytest.mark.parametrize("name", BRAIN_AGE_MODELS)
def test_the_brain_age_network_gives_the_age_in_float32_under_bfloat16(name):
    """bfloat16 would round an age 16-32 years from the centre to 1/8 year: the last layer runs in float32."""
    torch.manual_seed(0)
    model = build_model("brain-age", name, image_shape=(36, 36, 36)).eval()
    image, tabular = torch.randn(3, 1, 36, 36, 36), torch.eye(2)[torch.arange(3) % 2]
    features = {}
    model.final_layer.register_forward_pre_hook(lambda m, args: features.update(x=args[0]))
    with torch.no_grad(), training.autocast(torch.device("cpu"), "bf16"):
        assert model(image, tabular).dtype == torch.float32 and features["x"].dtype == torch.float32
        assert model.conv1_a(image).dtype == torch.bfloat16          # the rest of the network in bfloat16


@pytest.mark.parametrize("n", [3, 6])
def test_a_brain_age_cohort_too_small_for_its_split_is_refused_in_one_line_before_anything_is_written(
        brain_age_cohort20, tmp_path, n):
    small = os.path.join(os.path.dirname(brain_age_cohort20), f"first{n}.csv")   # beside the images
    with open(small, "w") as f:
        f.write("\n".join(open(brain_age_cohort20).read().splitlines()[:n + 1]) + "\n")
    table = data.read_brain_age_table(small)
    parts = data.brain_age_split(table.age, table.sex, 0)
    proc = run_main(train_brain_age.main, *_ba_args(small, tmp_path, "--model", "imaging", "--epochs", "1"))
    assert_clean_error(proc, small, "{} training, {} validation and {} test".format(*map(len, parts)), "--split")
    assert _files(tmp_path) == []


# ----------------------------------------------------------------------------------------------
# Sec. 4.3: AD classification, Table 3
# The stratified 5-subset split and its folds, both hippocampi (one in training, both averaged in evaluation), Table
# 3's rows ensembling folds by Eq. 7-8, the attribute sweep.


def table2_cohort(seed=0):
    """Labels, sex and age with the sizes and proportions of Table 2 (2120 subjects)."""
    rng = np.random.default_rng(seed)
    labels = np.repeat([0, 1, 2], [740, 1015, 365])
    male = rng.random(len(labels)) < np.array([309 / 740, 569 / 1015, 198 / 365])[labels]
    age = rng.normal(np.array([72.2, 72.8, 75.1])[labels], 7.4)
    return (~male).astype(np.int64), labels, age


class _LogitsOfTheImage(nn.Module):
    """Logits that depend on the image nonlinearly, so that averaging probabilities and averaging logits differ."""

    def forward(self, image, tabular):
        x = image.flatten(1)
        return torch.stack([3 * x.mean(1), x.amax(1), -2 * x.mean(1)], 1) + tabular[:, :3]


def test_the_ad_split_is_five_subsets_by_its_seed_subset_4_tests_every_fold_and_subset_k_validates_fold_k():
    sex, labels, age = table2_cohort()
    subsets = data.ad_split(sex, labels, age, seed=1)
    assert set(subsets.tolist()) == {0, 1, 2, 3, 4} and np.ptp(np.bincount(subsets)) <= 1
    for fold in range(4):                   # disjoint, together every subject, one test subset for every fold
        tr, va, te = data.ad_fold(subsets, fold)
        assert np.array_equal(te, np.flatnonzero(subsets == 4)) and np.array_equal(va, np.flatnonzero(subsets == fold))
        assert np.array_equal(tr, np.flatnonzero((subsets != 4) & (subsets != fold)))
    with pytest.raises(UserError):
        data.ad_fold(subsets, 4)
    assert np.array_equal(data.ad_split(sex, labels, age, 1), subsets)
    assert not np.array_equal(data.ad_split(sex, labels, age, 2), subsets)


def test_each_ad_subset_keeps_the_diagnosis_and_sex_proportions_and_every_sex_diagnosis_20_age_bin_stratum():
    sex, labels, age = table2_cohort()
    for seed in range(3):
        subsets = data.ad_split(sex, labels, age, seed)
        for m in (subsets == k for k in range(5)):
            assert all(abs((labels[m] == c).mean() - (labels == c).mean()) < 0.03 for c in range(3))
            assert abs(sex[m].mean() - sex.mean()) < 0.03
    age[::97], sex[5::131] = np.nan, -1                             # unknown age or sex: strata of their own
    strata = _strata(sex, labels, _age_bins(age))
    assert len(np.unique(strata)) > 80
    for seed in range(3):                                           # the five subsets differ by at most one
        subsets = data.ad_split(sex, labels, age, seed)
        for g in np.unique(strata):
            counts = np.bincount(subsets[strata == g], minlength=5)
            assert counts.max() - counts.min() <= 1, (seed, g, counts)


def test_mirrored_crop_is_the_flip_of_the_right_box_each_box_z_scored_over_its_non_zero_voxels():
    """Both sides read like a left one; a scanner's intensity scale and offset change no crop."""
    vol = np.random.default_rng(0).random((20, 24, 16)).astype(np.float32)
    vol[:, :3] = 0                                                           # outside the brain: stays 0
    crops = data.HippocampusCrops((1, 2, 3), (11, 4, 5), (6, 8, 7))
    left, right = crops(vol)
    z = lambda box: np.where(box != 0, (box - box[box != 0].mean()) / box[box != 0].std(), 0)
    np.testing.assert_allclose(left, z(vol[1:7, 2:10, 3:10]), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(right, z(np.flip(vol[11:17, 4:12, 5:12], axis=0)), rtol=1e-5, atol=1e-5)
    assert (left[:, 0] == 0).all() and (left[:, 1:] != 0).all()
    np.testing.assert_allclose(crops(np.where(vol != 0, 1000 * vol + 300, 0)), crops(vol), rtol=1e-5, atol=1e-5)
    with pytest.raises(UserError):
        data.HippocampusCrops((15, 0, 0), (0, 0, 0), (6, 8, 7))(vol)


def test_dataset_items_have_one_side_in_training_and_both_in_evaluation(ad_cohort40, tmp_path):
    t = data.read_ad_table(ad_cohort40)
    crops = data.HippocampusCrops.load(os.path.join(os.path.dirname(ad_cohort40), "crops.json"))
    cache = data.ImageCache(t.image_paths[:4], tmp_path / "c", transform=crops, names=t.subjects[:4])
    X, y4 = TabularPreprocessor().fit_transform(t.raw)[:4], t.labels[:4]
    train = data.ADDataset(cache, X, y4, train=True)
    img, tab, y = train[2]
    assert img.shape == (1,) + crops.size and img.dtype == torch.float32
    assert tab.shape == (15,) and y.dtype == torch.int64 and y.shape == () and int(y) == t.labels[2]
    img = data.ADDataset(cache, X, y4, train=False)[2][0]     # (training draws either side: the epoch test next)
    assert img.shape == (2, 1) + crops.size and np.array_equal(img[:, 0].numpy(), np.array(cache[2], np.float32))
    vols = [data.load_volume(p) for p in t.image_paths[:4]]     # uncropped volumes + crops also work
    assert data.ADDataset(vols, X, y4, crops=crops, train=False)[0][0].shape == (2, 1) + crops.size
    img, tab, y = data.TabularDataset(X, y4)[1]
    assert img.numel() == 0 and tab.shape == (15,) and y.dtype == torch.int64
    assert next(iter(torch.utils.data.DataLoader(train, batch_size=4)))[0].shape == (4, 1) + crops.size


def test_each_epoch_draws_its_hippocampus_sides_from_its_own_seed_with_loader_workers_as_a_resumed_run_does():
    """Workers kept over epochs would go on from their first epoch's seed: a resumed run would draw other sides."""
    pairs = np.stack([np.zeros((16, 2, 2, 2)), np.ones((16, 2, 2, 2))], 1).astype(np.float32)   # left 0, right 1
    ds, cpu = data.ADDataset(pairs, np.zeros((16, 3)), np.arange(16) % 3), torch.device("cpu")

    def epoch(loader, seed):
        torch.manual_seed(seed)                                   # as fit seeds each epoch from (version, epoch)
        return [(image.flatten(1).mean(1).tolist(), y.tolist()) for image, _, y in loader]
    loader = training.make_loader(ds, 4, 2, cpu, shuffle=True)
    whole = [epoch(loader, seed) for seed in (1, 2)]
    assert whole[1] == epoch(training.make_loader(ds, 4, 2, cpu, shuffle=True), 2)   # epoch 2, resumed after 1
    assert {side for batch, _ in whole[1] for side in batch} == {0.0, 1.0}


def test_validation_and_test_average_the_soft_predictions_of_both_hippocampi():
    g = torch.Generator().manual_seed(0)
    pairs = torch.randn(6, 2, 1, 3, 4, 3, generator=g) * torch.tensor([1.0, 3.0]).view(1, 2, 1, 1, 1, 1)
    tab, model, cpu = torch.randn(6, 4, generator=g), _LogitsOfTheImage(), torch.device("cpu")
    left, right = (model(pairs[:, k], tab) for k in (0, 1))
    expected = ((F.softmax(left, 1) + F.softmax(right, 1)) / 2).numpy()                   # (B, C)
    assert np.abs(expected - F.softmax((left + right) / 2, 1).numpy()).max() > 0.05       # logits would differ
    assert np.abs(expected - F.softmax(left, 1).numpy()).max() > 0.05                     # so would one side
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(pairs, tab, torch.arange(6) % 3), 4)
    probs, labels = training.predict(model, loader, cpu, lambda out: F.softmax(out, 1))
    np.testing.assert_allclose(probs, expected, atol=1e-6)
    np.testing.assert_array_equal(labels, np.arange(6) % 3)
    _, probs = train_ad.ad_metrics(model, loader, cpu, NAMES, "fp32")                      # what train_ad scores
    np.testing.assert_allclose(probs, expected, atol=1e-6)


def test_synthetic_ad_anatomy_depends_on_diagnosis_age_and_sex_and_its_boxes_mirror_each_other():
    grid = synthetic.head_grid(synthetic.AD_SYNTH["shape"])
    crops = synthetic.synthetic_crops(synthetic.AD_SYNTH["shape"], synthetic.AD_SYNTH["crop_size"])
    noise = np.random.default_rng(0).random(synthetic.AD_SYNTH["shape"])
    pair = crops(noise + noise[::-1])                           # symmetric about the midline: the two sides alike
    assert np.array_equal(pair[0], pair[1])
    dark = []
    for hippo in (1.0, 0.7):
        rng = np.random.default_rng(0)  # the same head, noise and bias field: only the hippocampus differs
        vol = synthetic.render_head(grid, synthetic.head_anatomy(rng, 1.0, hippo, 1.0, 0.06, 0.12), rng)
        boxes = [vol[tuple(slice(a, a + d) for a, d in zip(start, crops.size))] for start in (crops.left_start,
                                                                                             crops.right_start)]
        dark.append(sum((box < -1.2).sum() for box in boxes))   # CSF around a smaller hippocampus
    assert dark[1] > dark[0] * 1.03
    h = synthetic.ad_hippocampus           # the volume the image draws: smaller in women, with age, CN > MCI > AD
    assert h("CN", True, 73) == 1.0 and h("CN", False, 73) < 1.0 and h("CN", True, 80) < h("CN", True, 73)
    assert h("AD", True, 73) < h("MCI", True, 73) < 1.0 and h("AD", False, 73) / h("CN", False, 73) < h("AD", True, 73)


def test_ad_table_has_a_row_per_seed_and_version_with_mean_std_and_mann_whitney(ad_runs, capsys):
    runs, made, labels = ad_runs
    res = evaluate.evaluate_ad(str(runs))
    by = {m["model"]: m for m in res["models"]}
    assert list(by) == ["imaging", "tabular", "late-fusion", "hyperfusion"]      # Table 3's order; daft incomplete
    assert any("daft" in s for s in res["incomplete"])
    for model in ("imaging", "tabular", "hyperfusion"):
        rows = by[model]["rows"]
        assert [(r["split_seed"], r["version"]) for r in rows] == GROUPS
        for r in rows:  # each row: the Eq. 7-8 ensemble of its four folds
            ens = entropy_weighted_ensemble(made[(model, r["split_seed"], r["version"])])
            assert r["metrics"] == classification_metrics(labels[r["split_seed"]], ens, NAMES)
        ba = [r["BA"] for r in rows]
        assert by[model]["mean"]["BA"] == pytest.approx(np.mean(ba))
        assert by[model]["std"]["BA"] == pytest.approx(np.std(ba, ddof=1))
        summed = np.sum([r["metrics"]["confusion_matrix"] for r in rows], 0)
        assert np.array_equal(by[model]["confusion_matrix"], summed)
    for col in ("BA", "AUC", "TP-MCI"):
        pair = [r[col] for r in by["imaging"]["rows"]], [r[col] for r in by["hyperfusion"]["rows"]]
        expected = mannwhitneyu(*pair, alternative="two-sided").pvalue
        assert by["imaging"]["p_value"][col] == pytest.approx(expected)
        for one_sided in ("less", "greater"):                                 # the rows tell them apart
            assert mannwhitneyu(*pair, alternative=one_sided).pvalue != pytest.approx(expected)
    assert math.isnan(by["hyperfusion"]["p_value"]["BA"])
    assert [metrics.fmt_p(p) for p in (4e-4, 4e-3, 0.04, 0.5, math.nan)] == ["p<0.001", "p<0.01", "0.04", "0.50", "-"]
    for r in by["late-fusion"]["rows"]:      # the plain average of the imaging and tabular ensembles, per row
        key = (r["split_seed"], r["version"])
        fused = sum(entropy_weighted_ensemble(made[(m, *key)]) for m in ("imaging", "tabular")) / 2
        assert r["metrics"] == classification_metrics(labels[key[0]], fused, NAMES)
    md = (runs / "results_ad.md").read_text()                    # written in three forms, and printed
    assert "Late fusion" in md and "HyperFusion" in md and " ± " in md and "TP-MCI" in md
    with open(runs / "results_ad.json") as f:
        assert len(json.load(f)["models"]) == 4
    csv_lines = (runs / "results_ad.csv").read_text().strip().splitlines()
    assert len(csv_lines) == 1 + 4 and csv_lines[0].startswith("model,rows,BA mean,BA std,BA p")
    assert "Imaging only" in capsys.readouterr().out


def test_eq7_8_each_row_of_the_ad_table_ensembles_its_folds_sample_by_sample(ad_runs):
    runs, made, _ = ad_runs
    for (model, seed, version), probs in made.items():
        folds = [training.ad_run_dir(runs, model, seed, version, f) for f in range(4)]
        np.testing.assert_allclose(evaluate.ensemble_ad_folds(folds)["probs"], _eq7_8_by_hand(probs), rtol=1e-12)
    imaging = made[("imaging", 0, 0)]
    assert not np.allclose(_eq7_8_by_hand(imaging), imaging.mean(0), atol=1e-3)       # the folds' weights differ


@pytest.mark.parametrize("key,value,says", [
    ("split_seed", 1, "split_seed differs"), ("classes", 2, "classes differs"),
    ("subjects", [f"S{i + 1}" for i in range(10)], "their test subjects differ"),
    ("labels", np.arange(10) % 3, "their test labels differ"),
    ("images_sha256", "i2", "they were trained on different images")])
def test_folds_whose_configs_images_or_test_subjects_differ_are_refused_and_the_cli_says_so_in_one_line(tmp_path, key,
                                                                                                         value, says):
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 3, 10)
    for fold in range(4):
        differ = {"images_sha256": "i1", **({key: value} if fold == 2 else {})}
        fake_ad_run(tmp_path, "concat", 0, 0, fold, random_probs(rng, 10), differ.pop("labels", labels), **differ)
    with pytest.raises(UserError, match=f"cannot ensemble .*fold0 and .*fold2: {says}"):
        evaluate.evaluate_ad(str(tmp_path), quiet=True)
    assert_clean_error(run_main(evaluate.main, "ad", "--runs", tmp_path), "error: cannot ensemble", says)


def test_folds_ensemble_though_their_training_rows_gave_them_other_missing_indicators(tmp_path):
    """A column empty for a few subjects gives the folds whose training rows hold them its indicator (Sec. 3.3);
    Eq. 7-8 combine the folds' probabilities, whatever features each read."""
    rng = np.random.default_rng(1)
    labels, probs = rng.integers(0, 3, 10), [random_probs(rng, 10) for _ in range(4)]
    for fold in range(4):
        fake_ad_run(tmp_path, "concat", 0, 0, fold, probs[fold], labels, **(dict(
            tabular_columns=COLUMNS + ["AGE_missing"], n_tabular=len(COLUMNS) + 1) if fold == 2 else {}))
    (row,) = evaluate.evaluate_ad(str(tmp_path), quiet=True)["models"][0]["rows"]
    assert row["BA"] == classification_metrics(labels, _eq7_8_by_hand(probs), NAMES)["balanced_accuracy"]


def test_late_fusion_of_imaging_and_tabular_runs_of_other_test_subjects_is_refused(tmp_path):
    """App. B averages the two ensembles subject by subject: only over one test set."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 10)
    for model, names in (("imaging", None), ("tabular", [f"T{i}" for i in range(10)])):
        for fold in range(4):
            fake_ad_run(tmp_path, model, 0, 0, fold, random_probs(rng, 10), labels, subjects=names)
    with pytest.raises(UserError, match="late fusion of split seed 0 v0: the imaging and tabular runs have different"):
        evaluate.evaluate_ad(str(tmp_path), quiet=True)


def test_a_run_copied_into_another_runs_folder_is_refused_by_the_tables_that_name_runs_by_their_folders(ad_runs):
    """Table 3 reads a run's model, seed, version and fold off its folder, the brain-age table its model and version:
    fold 1 copied over fold 2 would be one member twice, imaging runs under tabular/ a row of the wrong model."""
    runs, made, labels = ad_runs
    for model, fold, other in (("tabular", 2, ("tabular", 0, 0, 1)), ("hyperfusion", 0, ("imaging", 0, 0, 0))):
        shutil.rmtree(training.ad_run_dir(runs, model, 0, 0, fold))
        shutil.copytree(training.ad_run_dir(runs, *other), training.ad_run_dir(runs, model, 0, 0, fold))
        assert_clean_error(run_main(evaluate.main, "ad", "--runs", runs), training.ad_run_dir(runs, model, 0, 0, fold),
                           "holds the run of " + training.ad_run_dir("", *other))
        shutil.rmtree(training.ad_run_dir(runs, model, 0, 0, fold))
    fake_ad_run(runs, "imaging", 0, 0, 1, made["imaging", 0, 0][1], labels[0], loss="ce")       # App. C.4's loss
    assert_clean_error(run_main(evaluate.main, "ad", "--runs", runs), training.ad_run_dir(runs, "imaging", 0, 0, 1),
                       "holds the run of " + training.ad_run_dir("", "imaging-ce", 0, 0, 1))   # never a Table 3 fold
    age = np.arange(12.0) + 50
    v1 = training.brain_age_run_dir(runs, "hyperfusion", 1)
    shutil.copytree(fake_brain_age_run(runs, 0, 1.0, age + 1, age, np.arange(12) % 2), v1)     # v0 twice in Eq. 6
    assert_clean_error(run_main(evaluate.main, "brain-age", "--runs", runs), v1,
                       "holds the run of " + training.brain_age_run_dir("", "hyperfusion", 0))


def test_ad_plots_draw_each_rows_confusion_roc_and_reliability_and_table3_at_their_size(ad_runs, monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    runs, made, labels = ad_runs
    texts, figures = _spy_on_figures(monkeypatch)
    out = runs / "figures"
    res = evaluate.main(["ad", "--runs", str(runs), "--plots", str(out)])
    printed = capsys.readouterr().out
    expected = sorted([f"{kind}_{m}_seed{s}_v{v}.png" for m in ["imaging", "tabular", "late-fusion", "hyperfusion"]
                       for s, v in GROUPS for kind in ("confusion", "roc", "reliability")] + ["table3.png"])
    assert sorted(os.listdir(out)) == expected and no_temp_files(out) and res["plots"]["skipped"] == {}
    for name in expected:
        assert _png_size(out / name) == _pixels(evaluate.SMALL if name.startswith("roc_") else evaluate.WIDE), name
        assert f"wrote {out / name}\n" in printed
    # what is drawn is the row's: its confusion matrix (counts and rows normalised), its classes' one-vs-rest AUCs
    hf = next(m for m in res["models"] if m["model"] == "hyperfusion")["rows"][0]
    cm = np.array(hf["metrics"]["confusion_matrix"], float)
    cells = texts["confusion_hyperfusion_seed0_v0.png"]
    assert [t for t in cells if t.isdigit()] == [str(int(v)) for v in cm.ravel()]
    assert [t for t in cells if t.startswith("0.") or t == "1.00"] == \
        [f"{v:.2f}" for v in (cm / cm.sum(1, keepdims=True)).ravel()]
    probs, roc = entropy_weighted_ensemble(made[("hyperfusion", 0, 0)]), texts["roc_hyperfusion_seed0_v0.png"]
    for c, name in enumerate(NAMES):
        assert f"{name} vs rest: AUC {metrics.fmt(roc_auc_score(labels[0] == c, probs[:, c]))}" in roc
    assert any(f"macro AUC {metrics.fmt(hf['AUC'])}" in t for t in roc)
    assert "Imaging only (3 rows)" in texts["table3.png"] and "HyperFusion (3 rows)" in texts["table3.png"]
    assert [bar.get_height() for bar in figures["table3.png"].axes[0].patches] == pytest.approx(
        [m["mean"][t] for m in res["models"] for t in res["paper_columns"]])        # each model's mean over its rows
    shown = texts["reliability_hyperfusion_seed0_v0.png"]          # the ensemble's ECE beside each member's
    assert f"ensemble: ECE {metrics.fmt(hf['ECE'])}" in shown
    for k, member in enumerate(made[("hyperfusion", 0, 0)]):
        assert f"fold {k}: ECE {metrics.fmt(metrics.calibration_metrics(labels[0], member)['ece'])}" in shown


def test_ad_sweep_changes_the_tabular_attribute_of_every_test_row(ad_cohort40, tmp_path):
    table = data.read_ad_table(ad_cohort40)
    train_idx, _, test_idx = data.ad_fold(data.ad_split(table.sex, table.labels, table.age, 0), 0)
    prep = TabularPreprocessor().fit([table.raw[i] for i in train_idx])
    torch.manual_seed(0)
    run = RunConfig(task="ad", model="hyperfusion", version=0, split_seed=0, fold=0, classes=3, loss="wce",
                    data_csv=str(ad_cohort40), cache_dir=str(tmp_path / "cache"), **SCHEDULE)
    save_run_checkpoint(tmp_path, run, {"n_tabular": prep.n_features, "tabular_columns": prep.columns,
                                        "class_names": NAMES, "crops": data.load_crops(None, ad_cohort40).as_dict()},
                        build_model("ad", "hyperfusion", n_tabular=prep.n_features), tabular=prep.state_dict())
    res = predict.sweep(str(tmp_path / "best.pt"), "abeta", ["200", "1700"])
    assert res["attribute"] == "ABETA" and len(res["rows"]) == 3 and res["rows"][0][1] == len(test_idx)
    p = [np.array(s["mean_probs"]) for s in res["summary"]]
    assert all(np.isclose(q.sum(), 1) for q in p) and not np.allclose(p[1], p[2], atol=1e-6)
    finished_run = load_run(tmp_path / "best.pt")                   # predicted fractions: of the argmax, per subject
    _, _, _, images = predict.test_set(finished_run)
    probs, _ = predict.run_outputs(finished_run, finished_run.model(), images, finished_run.tabular.transform(
        [table.raw[i] for i in test_idx]), table.labels[test_idx], torch.device("cpu"), 16, models.class_probabilities)
    assert res["summary"][0]["predicted_fraction"] == pytest.approx(np.bincount(probs.argmax(1), minlength=3) / len(
        test_idx)) and res["summary"][0]["mean_probs"] == pytest.approx(probs.mean(0))
    with pytest.raises(UserError, match="not a tabular attribute"):
        predict.sweep(str(tmp_path / "best.pt"), "MMSE", ["30"])
    with pytest.raises(UserError, match="--values -5: ABETA: negative value"):       # as a table's cell would be
        predict.sweep(str(tmp_path / "best.pt"), "ABETA", ["-5"])
    with pytest.raises(UserError, match="^--values Mal: PTGENDER: expected Male or Female"):   # before any reading
        predict.sweep(str(tmp_path / "best.pt"), "PTGENDER", ["Mal"])
    (tmp_path / "predictions.npz").write_bytes(b"PK\x03\x04 cut short")     # the run's test predictions, damaged
    assert_clean_error(run_main(evaluate.main, "sweep", tmp_path, "--attribute", "ABETA", "--values", "200"),
                       "predictions.npz", "unreadable")
    np.savez(tmp_path / "predictions.npz", subjects=np.array(["S1"]), ages=np.zeros(1))   # another file's arrays
    assert_clean_error(run_main(evaluate.main, "sweep", tmp_path, "--attribute", "ABETA", "--values", "200"),
                       "predictions.npz: not the test predictions of a training run (arrays: subjects, ages)")
    os.remove(tmp_path / "predictions.npz")
    (tmp_path / "last.pt").write_bytes(b"")              # an interrupted run: its best.pt is not its trained model
    assert_clean_error(run_main(evaluate.main, "sweep", tmp_path, "--attribute", "ABETA", "--values", "200"),
                       f"{tmp_path}: an unfinished run", "--resume")


def test_sweep_plots_draw_how_the_prediction_moves_with_the_attribute(brain_age_cohort20, tmp_path, capsys,
                                                                          monkeypatch):
    pytest.importorskip("matplotlib")
    path = _sweep_checkpoint(tmp_path / "best.pt", "hyperfusion", brain_age_cohort20, tmp_path / "cache")
    res = evaluate.main(["sweep", path, "--attribute", "Sex", "--values", "M", "F", "--plots", str(tmp_path / "fig")])
    file = tmp_path / "fig" / "sweep_brain-age_hyperfusion_v0_Sex.png"
    assert os.listdir(tmp_path / "fig") == [file.name] and _png_size(file) == _pixels(evaluate.SMALL)
    assert f"wrote {file}\n" in capsys.readouterr().out and res["plots"]["written"] == [str(file)]
    # AD: the mean probability and the predicted fraction of each class against the values (predict.sweep's form)
    ad = {"task": "ad", "model": "daft", "place": os.path.join("ad", "daft", "seed0", "v0", "fold0"),
          "attribute": "ABETA",
          "header": ["ABETA", "n", "mean P(CN)", "mean P(MCI)", "mean P(AD)"],
          "summary": [{"value": v, "mean_probs": p, "predicted_fraction": f, "balanced_accuracy": 0.5}
                      for v, p, f in ((None, [0.5, 0.3, 0.2], [1, 0, 0]), ("500", [0.2, 0.3, 0.5], [0, 0, 1]),
                                      ("1500", [0.6, 0.3, 0.1], [1, 0, 0]))]}
    _, figures = _spy_on_figures(monkeypatch)
    drawn = evaluate.sweep_figure(ad, str(tmp_path / "ad"), quiet=True)
    assert drawn["written"] == [str(tmp_path / "ad" / "sweep_ad_daft_seed0_v0_fold0_ABETA.png")]
    assert _png_size(drawn["written"][0]) == _pixels(evaluate.SMALL)
    lines = {ln.get_label(): list(ln.get_ydata())
             for ln in figures["sweep_ad_daft_seed0_v0_fold0_ABETA.png"].axes[0].lines}
    assert lines["mean P(AD)"] == [0.2, 0.5, 0.1] and lines["predicted AD"] == [0, 1, 0]
    evaluate.sweep_figure(dict(ad, place=os.path.join("ad", "daft", "seed0", "v0", "fold1")), str(tmp_path / "ad"))
    assert len(os.listdir(tmp_path / "ad")) == 2                                    # another fold's beside it


def _unfinished_run(runs, model, fold):
    """A run folder holding a last.pt and no metrics.json: an interrupted run."""
    folder = training.ad_run_dir(runs, model, 0, 0, fold)
    os.makedirs(folder)
    open(os.path.join(folder, "last.pt"), "w").close()


def test_the_runner_skips_finished_runs_resumes_interrupted_ones_and_trains_the_rest(tmp_path, monkeypatch, capsys):
    rng = np.random.default_rng(4)
    labels = rng.integers(0, 3, 12)
    for fold in (0, 1):
        fake_ad_run(tmp_path, "hyperfusion", 0, 0, fold, random_probs(rng, 12), labels)   # finished
    _unfinished_run(tmp_path, "hyperfusion", 2)
    calls = []

    def fake_train(args):
        calls.append(args)
        fake_ad_run(args["out"], args["model"], args["split_seed"], args["version"], args["fold"],
                    random_probs(rng, 12), labels)
        return {}

    monkeypatch.setattr(train_ad, "train_ad", fake_train)
    trained, skipped, res = evaluate.run_protocol("ad", str(tmp_path), models=["hyperfusion"], epochs=1,
                                                  data_csv="x.csv")
    assert [(a["fold"], a["resume"]) for a in calls] == [(2, True), (3, False)]
    assert all(a["epochs"] == 1 and a["data_csv"] == "x.csv" and a["quiet"] and a["model"] == "hyperfusion"
               for a in calls)
    assert len(skipped) == 2 and len(trained) == 2
    assert [m["model"] for m in res["models"]] == ["hyperfusion"] and res["models"][0]["n_rows"] == 1
    assert "skipped (finished)" in capsys.readouterr().out
    calls.clear()
    trained, skipped, _ = evaluate.run_protocol("ad", str(tmp_path), models=["hyperfusion"], epochs=1)
    assert calls == [] and trained == [] and len(skipped) == 4                          # a restart trains nothing
    evaluate.run_protocol("ad", str(tmp_path / "b"), models=["hyperfusion", "imaging"], epochs=2, tabular_epochs=50)
    made = [(a["model"], a["epochs"]) for a in calls][::4]                  # HyperFusion's MLPs first, at theirs
    assert made == [("tabular", 50), ("hyperfusion", 2), ("imaging", 2)]


def _job(folder, name, code, after=None):
    """A protocol job `name` whose process runs the Python `code`."""
    return evaluate.Job(str(folder / name), [sys.executable, "-c", code], after=after and str(folder / after))


def test_the_runners_time_left_counts_what_the_runs_still_running_have_run(tmp_path, monkeypatch):
    times, real = [], data.Progress.item_done

    def item_done(self, *args, spent=0.0):
        times.append(spent)
        return real(self, *args, spent=spent)
    monkeypatch.setattr(data.Progress, "item_done", item_done)
    evaluate.run_jobs([_job(tmp_path, "quick", "pass"), _job(tmp_path, "slow", "import time; time.sleep(1.5)")], 2,
                      quiet=True)
    assert times[0] > 0.1 and times[1] == 0                  # the slow run had run when the quick one ended


def test_a_failing_run_of_the_protocol_stops_it_in_one_line_its_dependents_never_start_and_the_others_finish(tmp_path):
    """--jobs 2: the tabular MLP fails; neither the HyperFusion run that starts from it nor a run waiting for a free
    slot starts; the run already training ends (failing too) before the error, which names the first run to fail,
    its exit and last line."""
    mark = lambda name, wait=0, after=None: _job(tmp_path, name, f"import time; time.sleep({wait}); open("
                                                 f"{str(tmp_path / name)!r} + '-ran', 'w').close(); exit({wait} and 4)",
                                                 after)
    jobs = [_job(tmp_path, "mlp", "print('CUDA out of memory'); exit(3)"), mark("hyperfusion", after="mlp"),
            mark("other", 1), mark("later")]
    with pytest.raises(UserError, match=r"^\S+mlp: training failed \(exit 3\): CUDA out of memory$"):
        evaluate.run_jobs(jobs, 2, poll_s=0.02, quiet=True)
    assert sorted(p.name for p in tmp_path.glob("*-ran")) == ["other-ran"]


def test_with_jobs_each_hyperfusion_run_waits_for_the_tabular_mlp_of_its_split_seed_version_and_fold(tmp_path,
                                                                                                   monkeypatch):
    """Sec. 4.3.6: HyperFusion's embedding starts from that MLP, so the two never train at once."""
    jobs = []

    def run_jobs(todo, *args, **kwargs):
        jobs.extend(todo)
        raise _Stop

    monkeypatch.setattr(evaluate, "run_jobs", run_jobs)
    with pytest.raises(_Stop):
        evaluate.run_protocol("ad", str(tmp_path), split_seeds=(0, 1), versions=(0, 1),
                              models=["hyperfusion", "tabular"], jobs=2)
    after = {j.run_dir: j.after for j in jobs}
    where = [(s, v, f) for s in (0, 1) for v in (0, 1) for f in range(4)]
    assert after == {**{training.ad_run_dir(tmp_path, "tabular", *w): None for w in where},
                     **{training.ad_run_dir(tmp_path, "hyperfusion", *w): training.ad_run_dir(tmp_path, "tabular", *w)
                        for w in where}}


def test_print_commands_gives_one_command_per_missing_run_tabular_first_and_trains_nothing(tmp_path, monkeypatch,
                                                                                             capsys):
    """--resume where a last.pt exists, finished runs left out, every tabular MLP before any HyperFusion run."""
    rng = np.random.default_rng(5)
    fake_ad_run(tmp_path, "tabular", 0, 0, 0, random_probs(rng, 12), rng.integers(0, 3, 12))      # finished
    _unfinished_run(tmp_path, "hyperfusion", 1)
    monkeypatch.setattr(train_ad, "train_ad", lambda a: pytest.fail("--print-commands trained a run"))
    evaluate.main(["protocol", "--task", "ad", "--runs", str(tmp_path), "--models", "hyperfusion", "tabular",
                   "tabular", "--versions", "0", "0", "--epochs", "3", "--print-commands"])   # named twice: once
    argvs = [shlex.split(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert len(argvs) == 7 and all(a[:2] == ["python", "train_ad.py"] for a in argvs)   # 2 models x 4 folds - 1
    parsed = [vars(train_ad.ad_arguments().parse_args(a[2:])) for a in argvs]
    assert [(p["model"], p["fold"], p["resume"]) for p in parsed] == [("tabular", f, False) for f in (1, 2, 3)] + \
        [("hyperfusion", f, f == 1) for f in range(4)]
    assert all(p["epochs"] == 3 and p["out"] == str(tmp_path) for p in parsed)
    # App. B's runs are CN vs AD and the MLPs take --tabular-epochs; brain age's runs carry the sex embedding's size,
    # the training sex and, with --verbose, their epoch lines; five versions each
    for task, extra, script in (("ad", ["--binary", "--tabular-epochs", "9"], train_ad.ad_arguments),
                                ("brain-age", ["--embedding-dim", "2", "--train-sex", "M", "--verbose"],
                                 train_brain_age.brain_age_arguments)):
        evaluate.main(["protocol", "--task", task, "--runs", str(tmp_path / task), "--epochs", "3", "--print-commands"]
                      + extra)
        parsed = [vars(script().parse_args(shlex.split(line)[2:])) for line in capsys.readouterr().out.splitlines()]
        if task == "ad":
            assert {(p["model"], p["epochs"], p["classes"], p["quiet"]) for p in parsed} == \
                {(m, 9 if m == "tabular" else 3, 2, True) for m in AD_MODELS}
        else:
            assert sorted((p["model"], p["version"], p["embedding_dim"], p["train_sex"], p["quiet"]) for p in parsed) \
                == sorted((m, v, 2, "M", False) for m in BRAIN_AGE_MODELS for v in range(5))


def test_run_protocol_with_two_jobs_trains_each_missing_run_once_and_prints_the_serial_table(ad_cohort60, tmp_path,
                                                                                             capsys):
    options = dict(models=["tabular"], epochs=1, data_csv=str(ad_cohort60))
    evaluate.run_protocol("ad", str(tmp_path / "serial"), **options)
    serial = capsys.readouterr().out
    done = training.ad_run_dir(tmp_path / "parallel", "tabular", 0, 0, 2)
    os.makedirs(os.path.dirname(done))
    shutil.copytree(training.ad_run_dir(tmp_path / "serial", "tabular", 0, 0, 2), done)   # one run already finished
    trained, skipped, _ = evaluate.run_protocol("ad", str(tmp_path / "parallel"), jobs=2, **options)
    parallel = capsys.readouterr().out
    missing = [training.ad_run_dir(tmp_path / "parallel", "tabular", 0, 0, f) for f in (0, 1, 3)]
    assert skipped == [done] and sorted(trained) == missing
    done_lines = re.findall(r"^run [123] of 3 done \(ad tabular seed0 v0 fold[013], .*", parallel, re.M)
    assert len(done_lines) == 3 and "left for the 1 still to train" in parallel and "; all 3 in " in done_lines[-1]
    for run_dir in missing:                                      # each trained once: one epoch in its log
        with open(os.path.join(run_dir, "log.csv")) as log:
            assert len(log.read().strip().splitlines()) == 1 + 1
    table = lambda out: out[out.index("| model |"):out.index("wrote ")]
    assert table(parallel) == table(serial)


# ----------------------------------------------------------------------------------------------
# App. A-C: preprocessing, oversampling
# App. A.1: RAS, 1.75 mm, a box centred on the brain mask's centre of mass, z-scored over the brain; App. C.4:
# oversampling draws every class equally often.


def synthetic_head(tmp_path):
    """A 1 mm LAS head: off-centre ellipsoidal brain (CSF, GM, WM) with a smooth bias, and its mask."""
    shape = (150, 176, 150)
    i, j, k = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij")
    centre = np.array([70.0, 96.0, 80.0])
    r = np.sqrt(((i - centre[0]) / 62) ** 2 + ((j - centre[1]) / 78) ** 2 + ((k - centre[2]) / 58) ** 2)
    vol = np.where(r < 1, 0.9, 0.0) - np.where((r < 1) & (r > 0.8), 0.35, 0) - np.where((r > 0.92) & (r < 1), 0.4, 0)
    vol = (vol * (1 + 0.1 * (i / shape[0] - 0.5))).astype(np.float32)
    affine = np.array([[-1, 0, 0, 80], [0, 1, 0, -110], [0, 0, 1, -70], [0, 0, 0, 1]], float)  # LAS, 1 mm
    nib.save(nib.Nifti1Image(vol, affine), tmp_path / "head.nii.gz")
    nib.save(nib.Nifti1Image((r < 1).astype(np.uint8), affine), tmp_path / "mask.nii.gz")
    return tmp_path / "head.nii.gz", tmp_path / "mask.nii.gz", affine @ np.append(centre, 1)


@pytest.mark.parametrize("shape", [(9, 11, 13), (10, 12, 14)])
def test_preprocess_centres_its_box_on_the_brain_masks_centre_of_mass_and_z_scores_the_brain_voxels_alone(
        shape, capsys):
    """The box starts at round(centre of mass - (shape - 1) / 2) axis by axis (shapes and centre differ per axis:
    a swapped axis or an off-by-one shows; for an even side n / 2 would put it a voxel off), of the mask, not of the
    brightness (a bright side would pull it); z-scores over the box's non-zero brain voxels alone, zero outside. The
    box cuts the brain here: a warning says how much it holds."""
    vol = np.random.default_rng(0).uniform(0.5, 1.5, (20, 24, 28)).astype(np.float32)
    vol[:8] *= 30                                                     # a bright side
    mask = np.zeros(vol.shape, bool)
    mask[3:12, 5:20, 9:22] = True
    mask[3:6, 5:8, 9:12] = False                                      # a centre of mass off the box's middle
    vol[6:8, 11:13, 14:16] = 0.0                                      # zeros inside the mask: not brain voxels
    affine, com = np.diag([2.0, 2.0, 2.0, 1.0]), np.array(np.nonzero(mask)).mean(1)
    out = preprocess.preprocess_volume(nib.Nifti1Image(vol, affine), nib.Nifti1Image(mask.astype(np.uint8), affine),
                                       spacing=2.0, shape=shape)
    start = np.round(com - (np.array(shape) - 1) / 2).astype(int)
    assert (np.round(com - np.array(shape) // 2) != start).any() == (shape[0] % 2 == 0)   # the two rules differ
    box = tuple(slice(s, s + n) for s, n in zip(start, shape))
    brain, values = mask[box] & (vol[box] != 0), vol[box].astype(np.float64)    # z-scored over non-zero voxels
    assert brain.any() and not brain.all() and (mask[box] & ~brain).any()       # brain, background, masked zeros
    expected = np.where(brain, (values - values[brain].mean()) / values[brain].std(), 0)
    np.testing.assert_allclose(out.get_fdata(), expected, rtol=1.3e-6, atol=1e-5)     # float32's
    np.testing.assert_array_equal(out.affine[:3, 3], 2.0 * start)
    assert f"box at 2 mm holds {mask[box].sum() / mask.sum():.0%} of the brain mask" in capsys.readouterr().err


@pytest.mark.parametrize("with_mask", [True, False])
def test_preprocess_gives_a_centred_zscored_90x120x99_volume_at_1_75mm(tmp_path, with_mask):
    head, mask, world_centre = synthetic_head(tmp_path)
    preprocess.preprocess_file(head, tmp_path / "out.nii.gz", mask if with_mask else None)
    img = nib.load(tmp_path / "out.nii.gz")
    vol = img.get_fdata()
    assert vol.shape == (90, 120, 99) and np.allclose(img.header.get_zooms(), 1.75)
    assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
    nz = vol != 0
    com = np.array(np.nonzero(nz)).mean(1)
    assert np.all(np.abs(com - (np.array(vol.shape) - 1) / 2) <= 2)
    assert np.allclose((img.affine @ np.append(com, 1))[:3], world_centre[:3], atol=2 * 1.75)
    assert abs(vol[nz].mean()) < 1e-4 and abs(vol[nz].std() - 1) < 1e-3


def test_preprocess_refuses_to_estimate_the_mask_of_an_image_normalised_already_and_takes_its_given_mask(tmp_path):
    """Negative brain voxels (a z-scored input) fall outside the estimated mask: half the brain would go silently."""
    head, mask, _ = synthetic_head(tmp_path)
    img = nib.load(head)
    vol = img.get_fdata(dtype=np.float32)
    inside = vol != 0
    z = nib.Nifti1Image(np.where(inside, (vol - vol[inside].mean()) / vol[inside].std(), 0).astype(np.float32),
                        img.affine)
    with pytest.raises(UserError, match="of the voxels are negative: an image normalised already.*--mask"):
        preprocess.preprocess_volume(z, None, 1.75, (40, 48, 40))
    out = np.asarray(preprocess.preprocess_volume(z, nib.load(mask), 1.75, (40, 48, 40)).dataobj)
    assert np.count_nonzero(out) > 0.9 * np.count_nonzero(np.asarray(preprocess.preprocess_volume(
        img, nib.load(mask), 1.75, (40, 48, 40)).dataobj))                  # the brain kept, as from the raw T1


def test_preprocess_reads_a_mask_of_0_and_255_as_the_same_brain_as_one_of_0_and_1():
    """A mask is binarised before it is resampled (a uint8 export's 255 would widen it through the interpolation),
    and the resampled one is the brain where it is over 0.5 (App. A.1's step 3)."""
    vol = np.random.default_rng(0).random((20, 20, 20)).astype(np.float32) + 1
    mask = np.zeros((20, 20, 20), np.float32)
    mask[4:16, 5:15, 3:17] = 1
    image = lambda v: nib.Nifti1Image(v, np.eye(4))
    outs = [np.asarray(preprocess.preprocess_volume(image(vol), image(mask * k), 1.75, (12, 12, 12)).dataobj)
            for k in (1, 255)]
    np.testing.assert_array_equal(outs[0], outs[1])
    resampled = np.asarray(preprocess.resample_isotropic(image(mask), 1.75).dataobj)    # then over 0.5: not widened
    assert np.count_nonzero(outs[0]) == np.count_nonzero(resampled > 0.5) < np.count_nonzero(resampled > 0)


def test_preprocess_reads_a_brain_whose_white_matter_is_most_of_its_voxels_at_one_value():
    """FreeSurfer's brain.mgz holds its white matter at 110: fuzzy c-means then starts two classes at that one value
    (percentiles 50 and 90) and ends them equal, white matter shared between them (0.5 each): still the brightest."""
    i, j, k = np.meshgrid(*[np.arange(20)] * 3, indexing="ij")
    r = np.sqrt((i - 9.5) ** 2 + (j - 9.5) ** 2 + (k - 9.5) ** 2)
    vol = (np.where(r < 8, 60.0, 0.0) + np.where(r < 7, 50.0, 0.0)).astype(np.float32)   # 68% white matter, at 110
    out = preprocess.preprocess_volume(nib.Nifti1Image(vol, np.eye(4)), None, 1.0, (16, 16, 16))
    box = vol[2:18, 2:18, 2:18]                                      # centred on the sphere's centre, 9.5
    np.testing.assert_allclose(np.asarray(out.dataobj), data.zscore(box, box > 0), rtol=0, atol=1e-5)


def test_preprocess_resamples_trilinearly_so_a_ramp_reads_as_the_ramp_between_the_input_voxels():
    """App. A.1's resampling to 1.75 mm: a 1 mm ramp along x read at 0, 1.75, 3.5, ... mm gives those values, the
    linear interpolation of the two voxels around each point (the nearest voxel would give 0, 2, 4, ...)."""
    ramp = np.broadcast_to(np.arange(20, dtype=np.float32)[:, None, None], (20, 6, 6)).copy()
    out = preprocess.resample_isotropic(nib.Nifti1Image(ramp, np.eye(4)), 1.75)
    assert out.shape == (11, 3, 3) and np.allclose(nib.affines.voxel_sizes(out.affine), 1.75)
    np.testing.assert_allclose(np.asarray(out.dataobj)[:, 1, 1], 1.75 * np.arange(11), rtol=0, atol=1e-5)


def test_an_estimated_brain_mask_is_the_largest_bright_component_with_the_dark_ventricles_inside_it():
    """Without --mask: voxels over half Otsu's threshold, the largest component kept (not a bright speck that skull
    stripping left), its holes filled (the ventricles, dark in a T1, are brain)."""
    i, j, k = np.meshgrid(*[np.arange(30)] * 3, indexing="ij")
    r = np.sqrt((i - 14) ** 2 + (j - 14) ** 2 + (k - 14) ** 2)
    vol = np.where(r < 10, 0.6, 0.0) + np.where(r < 7, 0.4, 0.0) - np.where(r < 3, 1.0, 0.0)   # GM, WM, ventricles
    vol[1:3, 1:3, 1:3] = vol[27:29, 27:29, 27:29] = 1.0               # specks outside it, before and after it
    np.testing.assert_array_equal(preprocess.estimate_brain_mask(vol.astype(np.float32)), r < 10)


def test_fuzzy_cmeans_finds_three_tissue_classes():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(m, 0.03, 3000) for m in (0.2, 0.55, 0.9)])
    c, u = preprocess.fuzzy_cmeans(x)
    assert np.allclose(c, [0.2, 0.55, 0.9], atol=0.02)
    inv = np.abs(x[:, None] - c) ** -2.0                     # Bezdek's memberships at m = 2: 1 / d^2, normalised
    np.testing.assert_allclose(u, inv / inv.sum(1, keepdims=True), rtol=0, atol=1e-9)


def test_preprocess_batch_mode_writes_every_subject_and_names_a_bad_row(tmp_path):
    csv_path = tiny_ad(tmp_path)
    args = ["--csv", csv_path, "--out-dir", tmp_path / "pre", "--shape", 8, 8, 8, "--spacing", 2]
    p = run_main(preprocess.main, *args)
    assert p.returncode == 0 and p.stderr == "", p.stderr                 # each brain whole in its box: no warning
    assert sorted(os.listdir(tmp_path / "pre")) == ["S0.nii.gz", "S1.nii.gz", "S2.nii.gz", "ad.csv"]
    assert data.read_ad_table(tmp_path / "pre" / "ad.csv").image_paths[2] == str(tmp_path / "pre" / "S2.nii.gz")
    assert nib.load(tmp_path / "pre" / "S1.nii.gz").shape == (8, 8, 8)
    (tmp_path / "pre" / "S1.nii.gz").write_bytes(b"kept")              # an output already there is kept
    assert run_main(preprocess.main, *args).returncode == 0 and (tmp_path / "pre" / "S1.nii.gz").read_bytes() == b"kept"
    os.remove(tmp_path / "images" / "S2.nii.gz")
    assert_clean_error(run_main(preprocess.main, *args, "--overwrite"), "ad.csv line 4", "S2.nii.gz")
    assert nib.load(tmp_path / "pre" / "S1.nii.gz").shape == (8, 8, 8)  # --overwrite: written again, in order
    assert no_temp_files(tmp_path / "pre")


def test_preprocess_batch_mode_reads_each_subjects_mask_from_its_column_and_leaves_the_column_out(tmp_path):
    rows = tiny_ad(tmp_path).read_text().splitlines()
    mask = np.zeros((8, 8, 8), np.float32)
    mask[1:7, 1:7, 1:7] = 1
    data.save_nifti(mask, 2.0, tmp_path / "m.nii.gz")
    (tmp_path / "masked.csv").write_text("\n".join([rows[0] + ",mask"] + [r + ",m.nii.gz" for r in rows[1:3]]
                                                   + [rows[3] + ","]) + "\n")            # S2's mask cell empty
    p = run_main(preprocess.main, "--csv", tmp_path / "masked.csv", "--out-dir", tmp_path / "pre", "--shape", 6, 6, 6,
                 "--spacing", 2, "--mask-column", "mask")
    assert p.returncode == 0 and re.match(r"warning: \S+masked.csv line 4: subject S2: column mask is empty: the brain "
                                          r"mask is estimated", p.stderr), p.stderr
    assert data.read_csv_rows(tmp_path / "pre" / "masked.csv", ())[1] == rows[0].split(",") + ["image"]
    alone = {}
    for name, m in (("masked", tmp_path / "m.nii.gz"), ("estimated", None)):
        preprocess.preprocess_file(tmp_path / "images" / "S0.nii.gz", tmp_path / f"{name}.nii.gz", m, 2, (6, 6, 6))
        alone[name] = nib.load(tmp_path / f"{name}.nii.gz").get_fdata()
    assert np.array_equal(nib.load(tmp_path / "pre" / "S0.nii.gz").get_fdata(), alone["masked"])
    assert not np.array_equal(alone["masked"], alone["estimated"])


def test_preprocess_n4_without_simpleitk_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(preprocess, "sitk", None)                    # as where SimpleITK is not installed
    data.save_nifti(np.ones((8, 8, 8), np.float32), 1.0, tmp_path / "h.nii.gz")
    with pytest.raises(UserError, match="SimpleITK"):
        preprocess.main([str(tmp_path / "h.nii.gz"), str(tmp_path / "o.nii.gz"), "--n4"])
    assert not (tmp_path / "o.nii.gz").exists()


def test_app_c4_oversampling_draws_every_class_equally_often_in_a_run_folder_apart_from_eq5s(ad_cohort60, tmp_path,
                                                                                            monkeypatch):
    """--loss ce-oversample: an epoch of len(training rows) drawn with replacement, each class expected equally
    often, though the training rows hold 13 CN, 18 MCI and 5 AD."""
    loaders, real = [], train_ad.fit

    def spy(model, train_loader, *args, **kwargs):
        loaders.append(train_loader)
        return real(model, train_loader, *args, **kwargs)

    monkeypatch.setattr(train_ad, "fit", spy)
    train_ad.main(_tabular_args(ad_cohort60, tmp_path, "--epochs", "1", "--loss", "ce-oversample"))
    train_ad.main(_tabular_args(ad_cohort60, tmp_path, "--epochs", "1"))      # Eq. 5's run beside it, in its own folder
    assert [load_run(_run_dir(tmp_path, m)).run.loss for m in ("tabular-ce-oversample", "tabular")] == [
        "ce-oversample", "wce"]
    table = data.read_ad_table(ad_cohort60, need_images=False)
    labels = table.labels[data.ad_fold(data.ad_split(table.sex, table.labels, table.age, 0), 1)[0]]
    assert np.bincount(labels).tolist() == [13, 18, 5]
    sampler = loaders[0].sampler
    assert sampler.num_samples == len(labels) and sampler.replacement
    expected = np.bincount(labels, weights=sampler.weights.numpy()) / float(sampler.weights.sum())
    np.testing.assert_allclose(expected, 1 / 3, rtol=1e-9)                  # exactly, in expectation
    torch.manual_seed(0)
    drawn = np.bincount(labels[np.concatenate([list(sampler) for _ in range(300)])], minlength=3)
    assert np.abs(drawn / drawn.sum() - 1 / 3).max() < 0.02, drawn         # 10,800 draws: 4 sigma of noise


# ----------------------------------------------------------------------------------------------
# The program: real data in
# Tables and NIfTI folders read as exported (ADNIMERGE, aliases, .nii, BOM; brain-age scans at any intensity scale),
# the image cache decoded once and kept in step with its sources, the synthetic cohorts.


def _nii_copy(cohort_csv, folder):
    """The cohort's table, crops and images in `folder`, the images as uncompressed .nii: one volume of one shape
    then always has one file size, as re-registered scans do. -> the CSV path."""
    os.makedirs(folder / "images")
    src = os.path.dirname(cohort_csv)
    for name in ("ad.csv", "crops.json"):
        shutil.copy(os.path.join(src, name), folder / name)
    for f in os.listdir(os.path.join(src, "images")):
        nib.save(nib.load(os.path.join(src, "images", f)), folder / "images" / f.replace(".nii.gz", ".nii"))
    return folder / "ad.csv"


@pytest.fixture(scope="module")
def nii_imaging_run(ad_cohort40, tmp_path_factory):
    """An imaging-only AD run (one epoch) on a .nii copy of the 40-subject cohort -> (the table, the runs folder)."""
    folder = tmp_path_factory.mktemp("nii40")
    csv_path = _nii_copy(ad_cohort40, folder / "cohort")
    proc = run_main(train_ad.main, *_ad_args(csv_path, folder / "runs", "--model", "imaging", "--epochs", "1"))
    assert proc.returncode == 0, proc.stderr
    return csv_path, folder / "runs"


def _predict_rows(run_dir, csv_path, out, n=8):
    """predict.py's rows for the table's first n subjects (a table beside it: one cache) -> ({subject: row}, stderr)."""
    first = os.path.join(os.path.dirname(csv_path), f"first{n}.csv")
    with open(first, "w") as f:
        f.write("\n".join(open(csv_path).read().splitlines()[:n + 1]) + "\n")
    proc = run_main(predict.main, run_dir, "--data-csv", first, "--out", out, "--quiet")
    assert proc.returncode == 0, proc.stderr
    return {r.split(",")[0]: r for r in open(out).read().splitlines()[1:]}, proc.stderr


def _set_inputs(run_dir, **inputs):
    """Overwrite data facts in a run's best.pt, as a training on other data would have stored them."""
    path = os.path.join(run_dir, "best.pt")
    ckpt = torch.load(path, weights_only=True)
    ckpt["inputs"].update(inputs)
    training.save_checkpoint(ckpt, path)


def test_brain_age_scans_at_another_scanners_intensity_scale_are_read_as_their_z_scores_in_training_and_prediction(
        brain_age_cohort40, brain_age_run, tmp_path, monkeypatch):
    """Sec. 4.2.1: every image z-scored over its non-zero voxels before the model reads it; a raw export (its
    scale, one per scan) predicts as the preprocessed scans do, and training reads its images through it too."""
    table, rng, (_, run_dir) = data.read_brain_age_table(brain_age_cohort40), np.random.default_rng(0), brain_age_run
    os.makedirs(tmp_path / "images")
    for p in table.image_paths:
        img = nib.load(p)
        v = np.asarray(img.dataobj, np.float32)                  # z-scored, above -4
        nib.save(nib.Nifti1Image(np.where(v != 0, rng.uniform(300, 3000) * (v + 4), 0).astype(np.float32),
                                 img.affine), tmp_path / "images" / os.path.basename(p))
    shutil.copy(brain_age_cohort40, tmp_path / "raw.csv")
    as_stored = _predict(run_dir, "--data-csv", brain_age_cohort40, "--out", tmp_path / "a.csv")["combined"]
    raw = _predict(run_dir, "--data-csv", tmp_path / "raw.csv", "--out", tmp_path / "b.csv")["combined"]
    np.testing.assert_allclose(raw, as_stored, atol=1e-3)
    seen = []

    def prepare(cache, progress=True):                           # training decodes its images with the transform
        seen.append(cache.transform)
        raise _Stop
    monkeypatch.setattr(data.ImageCache, "prepare", prepare)
    with pytest.raises(_Stop):
        train_brain_age.main(_ba_args(tmp_path / "raw.csv", tmp_path / "runs", "--epochs", "1"))
    assert seen == [data.BRAIN_ZSCORE]


def test_synthetic_ad_cohort_loads_back_with_its_shapes_and_labels(ad_cohort40):
    t = data.read_ad_table(ad_cohort40)
    meta = json.load(open(os.path.join(os.path.dirname(ad_cohort40), "cohort.json")))
    assert len(t.subjects) == 40 and t.labels.dtype == np.int64 and all(os.path.isfile(p) for p in t.image_paths)
    assert np.bincount(t.labels).tolist() == [meta["class_counts"][c] for c in data.CLASS_NAMES] == [14, 19, 7]
    vol = data.load_volume(t.image_paths[0])
    assert vol.shape == tuple(meta["image_shape"])
    assert np.allclose(nib.load(t.image_paths[0]).header.get_zooms(), meta["spacing_mm"])
    crops = data.HippocampusCrops.load(os.path.join(os.path.dirname(ad_cohort40), "crops.json"))
    assert crops(vol).shape == (2,) + crops.size
    assert TabularPreprocessor().fit_transform(t.raw).shape == (40, 15)          # the paper's n_tab = 15
    two = data.read_ad_table(ad_cohort40, classes=2)
    assert set(two.labels.tolist()) == {0, 1} and len(two.subjects) == 14 + 7
    assert ",," in open(ad_cohort40).read()                                      # empty cells = missing values
    assert re.search(r",[<>]\d", open(ad_cohort40).read())                     # CSF censored as ADNIMERGE writes it
    assert all(0.3 < np.mean([r[c] == "" for r in t.raw]) < 0.7 for c in ("ABETA", "FDG", "AV45"))   # about half


def test_group_aliases_read_as_mci_and_ad_a_group_map_wins_over_them_and_check_ad_accepts_the_table(tmp_path, capsys):
    """--group-map first, then the aliases: a study that counts early MCI as CN maps EMCI=CN, and is obeyed."""
    csv_path = tiny_ad(tmp_path, group="LMCI")
    csv_path.write_text(csv_path.read_text().replace("S0,AD", "S0,Dementia").replace("S2,AD", "S2,EMCI")
                        .replace(",300,", ",-4,", 1))                    # S0's TAU: ADNI's missing-value code
    assert data.read_ad_table(csv_path).labels.tolist() == [2, 1, 1]
    assert data.read_ad_table(csv_path, group_map=data.parse_group_map(["EMCI=CN"])).labels.tolist() == [2, 1, 0]
    data.main(["check-ad", str(csv_path)])
    out = capsys.readouterr().out
    assert out.startswith("ok:") and "CN 0, MCI 2, AD 1" in out
    assert "TAU 1 (33%)" in out and "FDG 3 (100%)" in out               # the code counted as an empty cell


def test_from_adnimerge_keeps_one_row_per_subject_with_the_diagnosis_of_that_visit(tmp_path):
    merged = tmp_path / "ADNIMERGE.csv"
    merged.write_text(ADNIMERGE)
    p = run_main(data.main, "from-adnimerge", merged, "--out", tmp_path / "t.csv", "--visit", "BL")   # any case
    assert p.returncode == 0, p.stderr
    assert "kept 3 subjects (CN 1, MCI 1, AD 1)" in p.stdout and "1 subjects without a 'BL' visit" in p.stdout
    assert "DX_bl SMC 1" in p.stdout
    t = data.read_ad_table(tmp_path / "t.csv", need_images=False)
    assert t.subjects == ["011_S_0001", "011_S_0004", "011_S_0005"] and t.labels.tolist() == [0, 1, 2]
    assert np.isnan(t.age[1]) and t.raw[0]["ABETA"] == ">1700"        # empty and censored cells as exported
    assert t.raw[2]["ABETA"] == "<200"                                # a visit's row twice: the first kept
    p = run_main(data.main, "from-adnimerge", merged, "--out", tmp_path / "t.csv", "--group-map", "SMC=CN")
    assert "kept 4 subjects (CN 2, MCI 1, AD 1)" in p.stdout
    run_main(data.main, "from-adnimerge", merged, "--out", tmp_path / "m12.csv", "--visit", "m12")
    t = data.read_ad_table(tmp_path / "m12.csv", need_images=False)
    assert t.subjects == ["011_S_0001"] and t.labels.tolist() == [1] and t.age[0] == pytest.approx(75.3)
    assert_clean_error(run_main(data.main, "from-adnimerge", tmp_path / "t.csv", "--out", tmp_path / "x.csv"),
                       "t.csv", "missing columns PTID, VISCODE")
    assert not (tmp_path / "x.csv").exists()
    trimmed = tmp_path / "trimmed.csv"         # no Years_bl: an m12 row's AGE would pass for the age at m12
    trimmed.write_text("\n".join(",".join(r.split(",")[:15] + r.split(",")[16:]) for r in ADNIMERGE.splitlines()))
    assert_clean_error(run_main(data.main, "from-adnimerge", trimmed, "--out", tmp_path / "x.csv", "--visit", "m12"),
                       "trimmed.csv", "missing column Years_bl")
    assert not (tmp_path / "x.csv").exists()


def test_check_ad_preview_draws_the_boxes_and_crops_as_rgb_pngs_that_matplotlib_reads_with_or_without_it(
        ad_cohort40, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)          # the writer needs no optional dependency
    p = run_main(data.main, "check-ad", ad_cohort40, "--preview", tmp_path / "pv", "--preview-n", "2")
    monkeypatch.undo()
    assert p.returncode == 0 and "wrote 4 PNGs" in p.stdout and no_temp_files(tmp_path / "pv"), p.stderr
    (X, Y, Z), (D, H, W) = synthetic.AD_SYNTH["shape"], synthetic.AD_SYNTH["crop_size"]
    subject = data.read_ad_table(ad_cohort40).subjects[0]
    assert _png_size(tmp_path / "pv" / f"{subject}_boxes.png") == (2 * (X + 2), max(Y, Z))  # axial | coronal
    assert _png_size(tmp_path / "pv" / f"{subject}_crops.png") == (2 * (D + 2 + D + 2), max(H, W))
    mpl_image = pytest.importorskip("matplotlib.image")
    for name in os.listdir(tmp_path / "pv"):
        w, h, colour = _png_header(tmp_path / "pv" / name)
        assert colour == 2 and mpl_image.imread(tmp_path / "pv" / name).shape == (h, w, 3)
    axial = mpl_image.imread(tmp_path / "pv" / f"{subject}_boxes.png")[:, :X]     # x across: left box red, right green
    crops = data.HippocampusCrops.load(os.path.join(os.path.dirname(ad_cohort40), "crops.json"))
    for rgb, start in (([1, 0, 0], crops.left_start), ([0, 1, 0], crops.right_start)):
        assert np.argwhere((axial == rgb).all(2))[:, 1].min() == start[0]


def test_a_table_saved_by_a_spreadsheet_with_a_bom_crlf_line_ends_and_blank_rows_reads_as_the_plain_one(tmp_path):
    table = tiny_ad(tmp_path)
    excel = tmp_path / "excel.csv"                              # Excel's "CSV UTF-8": a BOM, then CRLF lines
    lines = table.read_text().splitlines()
    lines = lines[:2] + [""] + lines[2:] + [",,,,,,,,,,", ""]     # a blank line, and rows of empty cells at the end
    excel.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines).encode())
    plain, saved = data.read_ad_table(table), data.read_ad_table(excel)
    assert saved.subjects == plain.subjects == ["S0", "S1", "S2"] and saved.raw == plain.raw
    assert not saved.skipped                                    # no row counted as one without a diagnosis
    assert saved.labels.tolist() == plain.labels.tolist()
    excel.write_text(table.read_text().replace("PTGENDER", "ptgender ").replace("AGE", "Age"))   # another export's case
    assert data.read_ad_table(excel).raw == plain.raw
    excel.write_text("subject,AGE,sex\nS0,70,M\n")
    assert data.read_brain_age_table(excel, need_images=False, for_prediction=True).age.tolist() == [70.0]


def test_cache_decodes_once_and_redecodes_a_changed_source(tmp_path):
    paths = data.read_ad_table(tiny_ad(tmp_path)).image_paths
    crops = data.HippocampusCrops((0, 0, 0), (4, 0, 0), (4, 8, 8))
    cache = data.ImageCache(paths, tmp_path / "cache", transform=crops).prepare(progress=False)
    assert cache.n_decoded == 3
    first = np.array(cache[1])
    assert isinstance(cache[1], np.memmap) and first.shape == (2, 4, 8, 8) and first.dtype == np.float32
    again = data.ImageCache(paths, tmp_path / "cache", transform=crops)
    again.prepare(progress=False)
    np.array(again[1])
    assert again.n_decoded == 0                                 # served from the .npy, no gzip decode
    changed = np.ones((8, 8, 8), np.float32)
    changed[0, 0, 0] = 2                                        # (a constant image would be refused: no signal)
    data.save_nifti(changed, 2.0, paths[1])
    os.utime(paths[1], ns=(1, 10**18))                          # a changed source (new mtime)
    assert np.array_equal(np.array(again[1]), crops(changed)) and again.n_decoded == 1
    entries = lambda: [f for f in os.listdir(tmp_path / "cache") if f.endswith(".npy")]   # (and sources.json)
    assert len(entries()) == 3                                  # the stale entry was removed
    other = data.ImageCache(paths, tmp_path / "cache", transform=data.HippocampusCrops((0, 0, 0), (4, 0, 0), (4, 8, 4)))
    assert other[0].shape == (2, 4, 8, 4) and other.n_decoded == 1    # other boxes: an entry of their own
    assert len(entries()) == 4 and again[0].shape == (2, 4, 8, 8) and again.n_decoded == 1


def test_the_cache_holds_every_voxel_as_float32_reads_it_a_raw_scan_beyond_float16s_range_included(tmp_path):
    """No rounding between the NIfTI and the network: a uint16 scanner's 65535 and its fractions stay as they are."""
    paths = data.read_ad_table(tiny_ad(tmp_path)).image_paths
    bright = (np.random.default_rng(0).random((8, 8, 8)) * 65535).astype(np.float32)
    bright[1, 2, 3] = 65535.0
    data.save_nifti(bright, 2.0, paths[0])
    cache = data.ImageCache(paths, tmp_path / "cache").prepare(progress=False)
    assert all(np.array_equal(cache[i], data.load_volume(p)) for i, p in enumerate(paths))
    assert np.array_equal(cache[0], bright) and float(np.max(cache[0])) == 65535


def test_an_image_replaced_in_place_by_one_of_the_same_size_with_its_times_kept_is_noticed(nii_imaging_run, tmp_path):
    """--resume and run-protocol adding folds are refused by the images' fingerprint; predict.py reads the new
    scan (its row changes, no other does), never the old decoded crops."""
    csv_path, runs = nii_imaging_run
    run_dir = _run_dir(runs, "imaging")
    before, _ = _predict_rows(run_dir, csv_path, tmp_path / "before.csv")
    table = data.read_ad_table(csv_path)
    target, st = table.image_paths[3], os.stat(table.image_paths[3])
    blob = open(table.image_paths[5], "rb").read()
    assert len(blob) == st.st_size and blob != open(target, "rb").read()
    with open(target, "r+b") as f:                            # in place: the same file, size and inode
        f.write(blob)
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))     # times set back, as a copy that keeps them does
    assert (os.stat(target).st_size, os.stat(target).st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    after, _ = _predict_rows(run_dir, csv_path, tmp_path / "after.csv")
    assert [s for s in before if before[s] != after[s]] == [table.subjects[3]]
    resume = _ad_args(csv_path, runs, "--model", "imaging", "--epochs", "2", "--resume")
    assert_clean_error(run_main(train_ad.main, *resume), "last.pt", "another run", "images_sha256")
    protocol = ["--task", "ad", "--models", "imaging", "--epochs", "1", "--data-csv", csv_path, "--runs", runs]
    assert_clean_error(run_main(evaluate.main, "protocol", *protocol), run_dir, "other images", "images_sha256")
    assert sorted(os.listdir(os.path.dirname(run_dir))) == ["fold1"]   # folds 0, 2, 3 would train on the new scan


def _zero_entry(path):
    """Every data byte of a cache entry zero, the file's size kept."""
    held = np.load(path, mmap_mode="r+")
    held[:] = 0
    held.flush()


def test_a_damaged_or_mismatched_cache_entry_is_decoded_again_with_one_warning_and_never_used(nii_imaging_run,
                                                                                            tmp_path, capsys):
    """Entries zeroed, cut short (in the data, in the header) or holding another subject's crops: predict.py gives
    the sound cache's output with one `warning:` line naming them; a reader that skips prepare() checks too."""
    csv_path, runs = nii_imaging_run
    run_dir = _run_dir(runs, "imaging")
    sound, err = _predict_rows(run_dir, csv_path, tmp_path / "sound.csv")
    assert "warning" not in err
    table = data.read_ad_table(csv_path)
    cache = data.ImageCache(table.image_paths, os.path.join(os.path.dirname(csv_path), "cache"),
                            transform=data.load_crops(None, csv_path), names=table.subjects)
    zeroed, cut, wrong, headless, donor = (cache.entry(i) for i in (0, 1, 2, 3, 7))
    _zero_entry(zeroed)
    with open(cut, "r+b") as f:
        f.truncate(os.path.getsize(cut) // 2)
    with open(headless, "r+b") as f:
        f.truncate(40)                                         # cut inside the .npy header
    shutil.copy(donor, wrong)                                  # a sound entry, of another subject
    again, err = _predict_rows(run_dir, csv_path, tmp_path / "again.csv")
    assert again == sound
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning:") and "4 entries" in lines[0], err
    for i, why in ((0, "checksum"), (1, "truncated"), (2, "another path"), (3, "unreadable")):
        assert f"{cache.names[i]} (" in lines[0] and why in lines[0], (why, err)
    first = np.array(cache[0])                                 # a reader without prepare()
    _zero_entry(zeroed)
    capsys.readouterr()
    fresh = data.ImageCache(cache.paths, cache.cache_dir, transform=cache.transform, names=cache.names)
    np.testing.assert_array_equal(np.array(fresh[0]), first)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: cache entry") and "decoded again" in err[0], err
    assert fresh.n_decoded == 1 and no_temp_files(cache.cache_dir)


def _one_abeta_cell_edited(src, dst):
    return _edit_table(src, dst, lambda k, c: c[:6] + ["123.4"] + c[7:] if k == 5 else c)


def test_the_protocol_refuses_to_train_beside_finished_runs_of_other_images(ad_cohort40, tmp_path):
    """Images replaced or preprocessed again since those runs: their table is the same, their images not."""
    table = data.read_ad_table(ad_cohort40)
    now = data.image_fingerprint(table.image_paths, tmp_path / "cache", table.subjects)
    for images, refused in ((now, False), ("0" * 64, True)):
        run_dir = fake_ad_run(tmp_path / images[:4], "imaging", 0, 0, 0, np.eye(3), [0, 1, 2], images_sha256=images,
                              table_sha256=data.table_sha256(ad_cohort40))
        with pytest.raises(UserError, match="trained on other images") if refused else contextlib.nullcontext():
            evaluate.check_protocol_data([run_dir], "ad", str(ad_cohort40), cache_dir=str(tmp_path / "cache"))


def test_a_table_edited_between_two_protocol_calls_is_refused_before_training_and_evaluate_never_mixes_it(
        ad_cohort60, tmp_path):
    """run-protocol stopped after two folds, the table edited, run-protocol again: refused before anything trains,
    naming a finished run and the table; folds trained on the edited table anyway are never ensembled."""
    csv_path, runs = tmp_path / "ad.csv", tmp_path / "runs"
    shutil.copy(ad_cohort60, csv_path)
    protocol = ["protocol", "--task", "ad", "--models", "tabular", "--epochs", "1", "--data-csv", csv_path,
                "--runs", runs]
    assert run_main(evaluate.main, *protocol).returncode == 0
    results = (runs / "results_ad.json").read_bytes()
    folds = [training.ad_run_dir(runs, "tabular", 0, 0, f) for f in range(4)]
    for f in (2, 3):                                           # as if the first call had been stopped after two
        shutil.rmtree(folds[f])
    _one_abeta_cell_edited(csv_path, csv_path)
    assert_clean_error(run_main(evaluate.main, *protocol), folds[0], str(csv_path), "another version", "sha256")
    assert not os.path.exists(folds[2]) and not os.path.exists(folds[3])          # nothing trained
    for f in (2, 3):                                           # trained on the edited table by hand
        assert run_main(train_ad.main, *_tabular_args(csv_path, runs, "--epochs", "1", "--fold", f)).returncode == 0
    assert_clean_error(run_main(evaluate.main, "ad", "--runs", runs), "cannot ensemble", folds[0], folds[2],
                       "different tables", "table_sha256")
    assert (runs / "results_ad.json").read_bytes() == results                       # no table of mixed folds


def test_runs_trained_on_other_images_or_tables_are_not_ensembled_nor_put_in_one_table(tmp_path):
    """Across one table's rows and models (folds: Sec. 4.3's test); a tabular-only run is not compared on images."""
    rng = np.random.default_rng(5)
    labels = rng.integers(0, 3, 10)
    ad = lambda runs, model, fold, table, images: fake_ad_run(tmp_path / runs, model, 0, 0, fold, random_probs(rng, 10),
                                                              labels, table_sha256=table, images_sha256=images)
    for fold in range(4):                                      # each row sound, the two models of two tables
        ad("b", "imaging", fold, "t1", "i1")
        ad("b", "tabular", fold, "t1", None)
    assert [m["model"] for m in evaluate.evaluate_ad(str(tmp_path / "b"), quiet=True)["models"]] == [
        "imaging", "tabular", "late-fusion"]
    for fold in range(4):
        ad("b", "hyperfusion", fold, "t2", "i1")
    assert_clean_error(run_main(evaluate.main, "ad", "--runs", tmp_path / "b"), "cannot put", "in one table",
                       "hyperfusion", "different tables")
    age, sex = rng.uniform(20, 80, 12), np.arange(12) % 2
    for v in range(3):
        _set_inputs(fake_brain_age_run(tmp_path / "c", v, 1.0 + v, age + rng.normal(0, 3, 12), age, sex),
                    table_sha256="t1" if v != 1 else "t2")
    assert_clean_error(run_main(evaluate.main, "brain-age", "--runs", tmp_path / "c"), "cannot ensemble", "v0",
                       "v1", "different tables")


def test_a_run_refuses_a_tabular_model_or_checkpoint_trained_on_another_table(ad_cohort60, tmp_path):
    other = _one_abeta_cell_edited(ad_cohort60, os.path.join(os.path.dirname(ad_cohort60), "ad_other_values.csv"))
    train_ad.main(_tabular_args(ad_cohort60, tmp_path, "--epochs", "1"))
    tab = _run_dir(tmp_path, "tabular")
    last = lambda: open(os.path.join(tab, "last.pt"), "rb").read()
    before = _files(tmp_path), last()
    ckpt = torch.load(os.path.join(tab, "last.pt"), weights_only=True)
    assert ckpt["inputs"]["table_sha256"] == data.table_sha256(ad_cohort60) and len(data.table_sha256(other)) == 64
    # HyperFusion on the other table finds the tabular model of this split, fold and version: refused
    assert_clean_error(run_main(train_ad.main, *_ad_args(other, tmp_path, "--model", "hyperfusion")),
                       "best.pt", "another run", "table_sha256", str(ad_cohort60))
    assert_clean_error(run_main(train_ad.main, *_tabular_args(other, tmp_path, "--resume")), "last.pt", "table_sha256")
    assert (_files(tmp_path), last()) == before
    # the evaluation tools refuse it too, and an impossible sweep value
    assert_clean_error(run_main(evaluate.main, "sweep", tab, "--attribute", "ABETA", "--values", "500",
                                "--data-csv", other), "ad_other_values.csv", "sha256")
    assert_clean_error(run_main(evaluate.main, "sweep", tab, "--attribute", "ABETA", "--values", "-5"),
                       "--values -5", "ABETA", "negative")
    # a checkpoint whose tensors have other shapes: refused naming it, not a traceback
    ckpt["model"] = {k: torch.zeros(v.shape[0] + 1, *v.shape[1:]) if v.dim() else v for k, v in ckpt["model"].items()}
    torch.save(ckpt, os.path.join(tab, "last.pt"))
    assert_clean_error(run_main(train_ad.main, *_tabular_args(ad_cohort60, tmp_path, "--resume")), "last.pt",
                       "does not fit")
    assert no_temp_files(tab)


def test_failed_synthesis_leaves_no_partial_cohort(tmp_path, monkeypatch):
    calls, real = [], synthetic.save_nifti

    def failing_save(vol, spacing, path):
        calls.append(path)
        if len(calls) == 5:
            raise OSError(28, "No space left on device", str(path))
        return real(vol, spacing, path)

    monkeypatch.setattr(synthetic, "save_nifti", failing_save)
    with pytest.raises(OSError):
        synthetic.make_synthetic_ad(tmp_path / "cohort", n=12)
    assert os.listdir(tmp_path) == []
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="mine"):
        synthetic.main(["ad", "--out", str(tmp_path / "mine"), "--n", "12"])
    assert os.listdir(tmp_path / "mine") == ["notes.txt"] and no_temp_files(tmp_path)
    (tmp_path / "data" / "synthetic_ad").mkdir(parents=True)       # half-deleted: the trainers' option is --data-dir
    (tmp_path / "data" / "synthetic_ad" / "ad.csv").write_text("Subject,Group\n")
    with pytest.raises(UserError, match="synthetic_ad: exists.*no cohort.json.*another folder$"):
        synthetic.builtin_cohort("ad", tmp_path / "data")
    with pytest.raises(UserError, match="--n"):
        synthetic.make_synthetic_brain_age(tmp_path / "x", n=3)
    assert not (tmp_path / "x").exists()


def test_a_built_in_cohort_that_another_generator_wrote_is_written_again_and_runs_started_at_once_make_it_once(
        tmp_path, monkeypatch):
    """Two runs started at once on a fresh --data-dir: the second generated too and moved the first's cohort away
    while the first read it ('cannot write ... cache ... No such file or directory'); a generation killed half-way
    left its hidden folder (32 MB of the AD cohort) beside the cohort for good."""
    folder, name, make, _ = synthetic.BUILTIN["brain-age"]
    made = []
    monkeypatch.setitem(synthetic.BUILTIN, "brain-age", (folder, name, lambda *a, **k: made.append(make(*a, **k)),
                                                         dict(n=12, seed=0)))
    os.makedirs(tmp_path / "at-once" / f".tmp-0123456789ab-{folder}" / "images")   # a generation killed half-way
    with ThreadPoolExecutor(2) as pool:
        assert len(set(pool.map(synthetic.builtin_cohort, ["brain-age"] * 2, [tmp_path / "at-once"] * 2))) == 1
    assert len(made) == 1 and os.listdir(tmp_path / "at-once") == [folder]
    csv_path = synthetic.builtin_cohort("brain-age", tmp_path)
    stamp = os.stat(csv_path).st_mtime_ns
    assert synthetic.builtin_cohort("brain-age", tmp_path) == csv_path and os.stat(csv_path).st_mtime_ns == stamp
    info_path = os.path.join(os.path.dirname(csv_path), "cohort.json")
    info = json.load(open(info_path))
    info["generator"]["atrophy_after_40"]["M"] = 0.6                                  # an older generator's
    json.dump(info, open(info_path, "w"))
    synthetic.builtin_cohort("brain-age", tmp_path)
    assert json.load(open(info_path))["generator"]["atrophy_after_40"]["M"] == \
        synthetic.BRAIN_AGE_SYNTH["atrophy_after_40"]["M"]


# ----------------------------------------------------------------------------------------------
# The program: bad input
# Every wrong input stops in one `error:` line naming the file, row, column or option, exit status 2, nothing
# half-written.


def _tiny_brain_age(folder, n=10, sex="MF", shapes=None, spacing=None):
    """An n-subject brain-age table with 8x8x8 images (shapes / spacing: {index: other}); returns the CSV path."""
    os.makedirs(folder / "images", exist_ok=True)
    rows = ["Subject,Age,Sex"]
    for i in range(n):
        vol = np.random.default_rng(i).random((shapes or {}).get(i, (8, 8, 8))).astype(np.float32)
        data.save_nifti(vol, (spacing or {}).get(i, 2.0), folder / "images" / f"B{i}.nii.gz")
        rows.append(f"B{i},{40 + 3 * i},{sex[i % len(sex)]}")
    (folder / "ba.csv").write_text("\n".join(rows) + "\n")
    return folder / "ba.csv"


def _renamed(src, dst, ids):
    """A copy of table `src` with its first len(ids) subjects renamed `ids` (the other rows dropped), each
    image named by an `image` column (an absolute path), so that an id need not be a file name."""
    rows, fields = data.read_csv_rows(src, ("Subject",))
    images = os.path.join(os.path.dirname(os.path.abspath(src)), "images")
    out = [dict(r, Subject=s, image=data.find_image(images, r["Subject"])) for s, (_, r) in zip(ids, rows)]
    data.write_csv(out, fields + ["image"], dst)
    return dst


FORMULA_IDS = ['=HYPERLINK("evil.example";"open me")', "+1+1", "@SUM(1)", "-2+3", "'quoted"]


def _sub(table, old, new, count=-1):
    table.write_text(table.read_text().replace(old, new, count))


def _cell(table, col, value):
    """Subject S1's cell of column `col` set to value (tiny_ad's table: S1 is on line 3)."""
    lines = [line.split(",") for line in table.read_text().splitlines()]
    lines[2][lines[0].index(col)] = value
    table.write_text("\n".join(",".join(cells) for cells in lines) + "\n")


def _image(folder, subject, vol=None, affine=None, header=None):
    """images/<subject>.nii.gz of a tiny_ad folder replaced (by default: 8x8x8 ones at 2 mm)."""
    vol = np.ones((8, 8, 8), np.float32) if vol is None else vol
    path = folder / "images" / f"{subject}.nii.gz"
    nib.Nifti1Image(vol, np.diag([2.0, 2.0, 2.0, 1.0]) if affine is None and header is None else affine,
                    header).to_filename(path)
    return path


def _halve(path):
    path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])


def _with_nan():
    vol = np.ones((8, 8, 8), np.float32)
    vol[1, 2, 3] = np.nan
    return vol


def _turned(degrees):
    """tiny_ad's affine under a rotation about z (as SPM's coregistration writes)."""
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    return np.array([[c, -s, 0, 0], [s, c, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]) @ np.diag([2.0, 2.0, 2.0, 1.0])


def _zero_y_voxel(folder):
    header = nib.Nifti1Image(np.ones((8, 8, 8), np.float32), np.eye(4)).header
    header["qform_code"], header["sform_code"], header["srow_y"] = 0, 1, [0, 0, 0, 0]   # a y axis of 0 mm
    _image(folder, "S1", header=header)


def _image_column(table, images):
    """An `image` column naming images/<images[k]>.nii.gz for subject k."""
    lines = table.read_text().splitlines()
    table.write_text("\n".join([lines[0] + ",image"] + [f"{line},images/{img}.nii.gz"
                                                         for line, img in zip(lines[1:], images)]) + "\n")


def _crops(folder, **box):
    """crops.json in `folder`: 4-voxel boxes at the origin, but for `box`."""
    (folder / "crops.json").write_text(json.dumps(dict(left_start=[0] * 3, right_start=[0] * 3, size=[4] * 3) | box))


# (what is wrong, an edit of tiny_ad's folder and table returning check-ad's further options, what the line names)
CHECK_AD_REFUSALS = [
    ("missing image", lambda d, t: os.remove(d / "images" / "S1.nii.gz"), ["line 3", "S1", "S1.nii.gz (or .nii)"]),
    ("truncated image", lambda d, t: _halve(d / "images" / "S2.nii.gz"), ["S2.nii.gz", "truncated"]),
    ("4-D image", lambda d, t: _image(d, "S0", np.ones((8, 8, 8, 2), np.float32)), ["S0.nii.gz", "(8, 8, 8, 2)"]),
    ("NaN voxel", lambda d, t: _image(d, "S1", _with_nan()), ["S1.nii.gz", "NaN"]),
    ("zero voxel size", lambda d, t: _zero_y_voxel(d), ["S1.nii.gz", "degenerate"]),
    ("rotated header", lambda d, t: _image(d, "S1", affine=_turned(3)), ["S1.nii.gz", "rotated", "preprocess.py"]),
    ("no Group column", lambda d, t: _sub(t, "Group", "Diagnosis"), ["ad.csv", "Group"]),
    ("no group is a diagnosis", lambda d, t: _sub(t, ",AD,", ",XYZ,") or _sub(t, ",CN,", ",,"),
     ["ad.csv", "no CN or MCI or AD subjects", "XYZ 2", "(empty) 1", "--group-map"]),
    ("a group map to no diagnosis", lambda d, t: ["--group-map", "XYZ=sick"], ["--group-map XYZ=sick"]),
    ("a value mapped twice", lambda d, t: ["--group-map", "XYZ=CN", "xyz=AD"], ["--group-map XYZ=CN xyz=AD", "two"]),
    ("non-numeric age", lambda d, t: _sub(t, "70.5", "seventy") or ["--no-images"], ["line 3", "AGE", "seventy"]),
    ("a cell too many", lambda d, t: _sub(t, "70.5", "70,extra"), ["line 3: 12 fields, the header has 11"]),
    ("a cell left out", lambda d, t: _sub(t, "70.5,", ""), ["line 3: 10 fields, the header has 11"]),  # shifted
    ("a censored age", lambda d, t: _sub(t, "70.5", ">70") or ["--no-images"], ["line 3", "AGE", "only the CSF"]),
    ("not UTF-8", lambda d, t: t.write_bytes(b"Subject,Group\n\xff\xfe,CN\n"), ["ad.csv line 2", "0xff", "UTF-8"]),
    *[(f"Latin-1 after {k} rows", lambda d, t, k=k: t.write_bytes(b"Subject,Group\r" + b"S,CN\r" * k + b"Jos\xe9,AD"),
       [f"ad.csv line {k + 2}: byte 0xe9 is not UTF-8"]) for k in (1, 9000)],     # CR lines; beyond a read's chunk
    ("empty file", lambda d, t: t.write_text(""), ["ad.csv", "no header"]),
    ("a column twice", lambda d, t: t.write_text("\n".join(ln + (",ABETA" if k == 0 else ",900") for k, ln in
                                                           enumerate(t.read_text().splitlines())) + "\n"),
     ["ad.csv", "column ABETA appears twice", "columns 7 and 12"]),
    ("unclosed quote", lambda d, t: _sub(t, "S1,CN,", 'S1,"CN,'), ["ad.csv line 3", "quote", "Group", "not closed"]),
    ("semicolons", lambda d, t: _sub(t, ",", ";"), ["ad.csv", "delimiter looks like a semicolon", "comma-separated"]),
    ("tabs", lambda d, t: _sub(t, ",", "\t"), ["ad.csv", "delimiter looks like a tab", "comma-separated"]),
    ("no --image-dir", lambda d, t: ["--image-dir", d / "nope"], ["--image-dir", "not found"]),
    ("--image-dir and an image column naming other files", lambda d, t: _image_column(t, ["S0", "S1", "S2"])
     or shutil.copytree(d / "images", d / "copies") and ["--image-dir", d / "copies"],
     ["line 2", "subject S0", "column image names", "--image-dir another file", "copies"]),
    ("one image for two subjects", lambda d, t: _image_column(t, ["S2", "S1", "S2"]),
     ["line 4", "subject S2", "also subject S0's"]),
    ("one image by a hard link", lambda d, t: os.link(d / "images" / "S0.nii.gz", d / "images" / "again.nii.gz")
     or _image_column(t, ["S0", "S1", "again"]), ["line 4", "subject S2", "also subject S0's"]),
    *[(f"subject {s}", lambda d, t, s=s: _sub(t, "S1,", f"{s},"), ["line 3", "not a plain file name"])
      for s in ("../escape", "/abs", "..")],
    *[(f"{col} {bad}", lambda d, t, col=col, bad=bad: _cell(t, col, bad) or ["--no-images"],
       ["line 3", "subject S1", f"column {col}", bad, why])
      for col, bad, why in [("TAU", "-3", "negative"), ("PTAU", "1e300", "impossible"), ("FDG", "-0.5", "negative"),
                            ("APOE4", "3", "one of 0, 1, 2"), ("APOE4", "1.5", "one of 0, 1, 2"),
                            ("PTEDUCAT", "55", "0 to 40")]],
    ("crops.json of two numbers", lambda d, t: _crops(d, left_start=[1, 2]), ["crops.json", "left_start"]),
    ("crops.json of a zero size", lambda d, t: _crops(d, size=[4, 0, 4]), ["crops.json", "size"]),
    ("crops.json of a negative start", lambda d, t: _crops(d, left_start=[-1, 0, 0]),
     ["crops.json", "left_start", "at least 0"]),
    ("crops.json beyond the images", lambda d, t: _crops(d, right_start=[6, 0, 0]),
     ["crops.json", "right hippocampus box", "does not fit in image shape (8, 8, 8)"]),
    ("a preview without images", lambda d, t: ["--no-images", "--preview", d / "pv"], ["--preview", "--no-images"]),
    ("a preview with boxes that do not fit", lambda d, t: ["--preview", d / "pv"],
     ["--preview", "default MNI152", "--crops", "does not fit in image shape (8, 8, 8)"]),
    ("a subject twice", lambda d, t: _sub(t, "S2,", "S0,"), ["ad.csv line 4", "subject S0 repeats line 2"]),
    ("a sex that is neither", lambda d, t: _cell(t, "PTGENDER", "Mal") or ["--no-images"],
     ["line 3", "subject S1", "column PTGENDER", "expected Male or Female, got 'Mal'"]),
]
PREPROCESS_REFUSES_TOO = {"truncated image": "S2", "NaN voxel": "S1"}     # the subject whose image it refuses


@pytest.mark.parametrize("case,edit,names", CHECK_AD_REFUSALS, ids=[c[0] for c in CHECK_AD_REFUSALS])
def test_check_ad_refuses_a_bad_table_or_image_in_one_line_naming_the_file_row_column_or_option(tmp_path, case, edit,
                                                                                              names):
    table = tiny_ad(tmp_path)
    options = edit(tmp_path, table)                          # the edits that return a list return options
    assert_clean_error(run_main(data.main, "check-ad", table, *(options if isinstance(options, list) else [])), *names)
    if case in PREPROCESS_REFUSES_TOO:                       # preprocess.py refuses the image too, writing nothing
        image = tmp_path / "images" / f"{PREPROCESS_REFUSES_TOO[case]}.nii.gz"
        assert_clean_error(run_main(preprocess.main, image, tmp_path / "out" / "o.nii.gz"), *names)
        assert not (tmp_path / "out").exists() and no_temp_files(tmp_path)


def test_check_ad_finds_nii_beside_nii_gz_and_reads_a_flipped_header_or_a_trailing_axis_of_one(tmp_path):
    """A flipped header is read (as_closest_canonical), a rotated one only by preprocess.py, as written."""
    table = tiny_ad(tmp_path)
    nib.save(nib.load(tmp_path / "images" / "S1.nii.gz"), tmp_path / "images" / "S1.nii")
    os.remove(tmp_path / "images" / "S1.nii.gz")
    _image(tmp_path, "S0", np.arange(512, dtype=np.float32).reshape(8, 8, 8, 1))
    _image(tmp_path, "S2", np.arange(512, dtype=np.float32).reshape(8, 8, 8), np.diag([-2.0, 2.0, 2.0, 1.0]))
    p = run_main(data.main, "check-ad", table)
    assert p.returncode == 0 and "images (8, 8, 8)" in p.stdout, p.stderr
    assert data.read_ad_table(table).image_paths[1] == str(tmp_path / "images" / "S1.nii")
    assert data.load_volume(tmp_path / "images" / "S0.nii.gz").shape == (8, 8, 8)
    # axes stored as z, x, y (a cyclic permutation): the headers' shape in RAS is the decoded volume's
    cyclic = _image(tmp_path, "S2", np.arange(192, dtype=np.float32).reshape(4, 6, 8),
                    np.array([[0, 2.0, 0, 0], [0, 0, 2.0, 0], [2.0, 0, 0, 0], [0, 0, 0, 1]]))
    assert data.check_image_geometry([cyclic], ["S2"])[0] == data.load_volume(cyclic).shape == (6, 8, 4)
    rotated = _image(tmp_path, "S2", affine=_turned(25))
    with pytest.raises(UserError, match="rotated"):
        data.load_nifti(rotated)
    read = data.load_nifti(rotated, canonical=False).affine                   # preprocess.py's reading: as written
    np.testing.assert_array_equal(read.astype(np.float32), _turned(25).astype(np.float32))


def test_a_scaled_integer_image_keeps_its_zero_background_so_a_box_is_z_scored_over_its_brain_alone(tmp_path):
    vol = np.zeros((8, 8, 8), np.float32)
    vol[2:6, 2:6, 2:6] = np.random.default_rng(0).normal(size=(4, 4, 4)) + 0.5
    img = nib.Nifti1Image(vol, np.diag([2.0, 2.0, 2.0, 1.0]))
    img.set_data_dtype(np.int16)                     # stored as int16 with a scl_slope and a non-zero scl_inter
    img.to_filename(tmp_path / "s.nii.gz")
    assert nib.load(tmp_path / "s.nii.gz").dataobj.inter != 0
    read, box = data.load_volume(tmp_path / "s.nii.gz"), data.HippocampusCrops((0, 0, 0), (0, 0, 0), (8, 8, 8))
    np.testing.assert_array_equal(read == 0, vol == 0)
    np.testing.assert_allclose(box(read), box(vol), atol=1e-3)


# what the voxels hold -> (what the refusal says, where, the value)
SPOILED = {"inf": ("NaN/inf", (3, 4, 5), np.inf), "huge": ("beyond +-1e+15", (3, 4, 5), 1e30),
           "negative": ("beyond +-1e+15", (9, 9, 9), -1e30), "zeros": ("no signal: every voxel is 0", ..., 0),
           "constant": ("no signal: every voxel is 3.5", ..., 3.5),
           "left box zeros": ("no signal in the left hippocampus box", np.s_[3:27, 8:44, 4:28], 0)}  # its crops.json


@pytest.mark.parametrize("case", SPOILED)
def test_images_with_non_finite_absurd_or_no_signal_values_are_refused(ad_cohort40, tmp_path, case):
    """An inf voxel, +-1e30 (a wrong header scale; z-scores overflow float32), all zeros (a failed registration),
    one constant or a hippocampus box of zeros: refused before any epoch naming the subject and the file; so by
    check-ad, and by preprocess.py where the whole image is spoiled."""
    says, where, value = SPOILED[case]
    table = data.read_ad_table(ad_cohort40)
    subject, source, folder = table.subjects[4], table.image_paths[4], tmp_path / "images"
    folder.mkdir()
    for p in table.image_paths[:4] + table.image_paths[5:]:
        os.symlink(p, folder / os.path.basename(p))
    vol = data.load_volume(source)
    vol[where] = value
    data.save_nifti(vol, synthetic.AD_SYNTH["spacing_mm"], folder / os.path.basename(source))
    args = _ad_args(ad_cohort40, tmp_path / "runs", "--model", "imaging", "--image-dir", folder,
                    "--cache-dir", tmp_path / "cache")
    assert_clean_error(run_main(train_ad.main, *args), f"subject {subject}", folder / os.path.basename(source), says)
    assert not (tmp_path / "runs").exists()
    assert_clean_error(run_main(data.main, "check-ad", ad_cohort40, "--image-dir", folder), f"subject {subject}", says)
    if case in ("inf", "zeros", "constant"):            # preprocess.py refuses it too, first thing, writing nothing
        assert_clean_error(run_main(preprocess.main, folder / os.path.basename(source), tmp_path / "o.nii.gz"), says)
        assert not (tmp_path / "o.nii.gz").exists()


def test_images_of_another_shape_or_voxel_size_are_refused_from_their_headers(ad_cohort40, tmp_path):
    ba = ["--out", tmp_path / "runs", "--epochs", "1", "--quiet"]
    csv_path = _tiny_brain_age(tmp_path / "a", shapes={6: (8, 9, 8)})
    assert_clean_error(run_main(train_brain_age.main, "--data-csv", csv_path, *ba), "B6.nii.gz", "subject B6",
                       "(8, 9, 8)", "(8, 8, 8)", "B0.nii.gz")
    assert_clean_error(run_main(evaluate.main, "select-layers", "--task", "brain-age", "--data-csv", csv_path),
                       "B6.nii.gz", "(8, 9, 8)")                 # select-layers too: not numpy's stack error
    assert not (tmp_path / "a" / "cache").exists() and not (tmp_path / "runs").exists()
    csv_path = _tiny_brain_age(tmp_path / "b", spacing={3: 1.9})           # 5% off: another grid all the same
    assert_clean_error(run_main(data.main, "check-brain-age", csv_path), "B3.nii.gz", "voxel size",
                       "(1.9, 1.9, 1.9)", "(2.0, 2.0, 2.0)")
    assert_clean_error(run_main(train_brain_age.main, "--data-csv", csv_path, *ba), "B3.nii.gz", "voxel size")
    # AD: one scan of another shape among the cohort's, through train_ad.py, before any crop is decoded
    images = tmp_path / "ad_images"
    images.mkdir()
    table = data.read_ad_table(ad_cohort40)
    for p in table.image_paths:
        os.symlink(p, images / os.path.basename(p))
    odd = table.subjects[7]
    os.remove(images / f"{odd}.nii.gz")
    data.save_nifti(np.zeros((20, 20, 20), np.float32), 1.0, images / f"{odd}.nii.gz")
    args = _ad_args(ad_cohort40, tmp_path / "runs", "--model", "imaging", "--image-dir", images,
                    "--cache-dir", tmp_path / "cache")
    assert_clean_error(run_main(train_ad.main, *args), f"subject {odd}", "(20, 20, 20)")
    assert not (tmp_path / "cache").exists() and not (tmp_path / "runs").exists()
    sl = ["select-layers", "--task", "ad", "--data-csv", ad_cohort40, "--image-dir", images, "--samples", 2]
    assert_clean_error(run_main(evaluate.main, *sl, "--draws", 2), f"subject {odd}", "(20, 20, 20)")  # not scored
    _crops(tmp_path, right_start=[300, 0, 0])        # boxes outside the images: the file named, as the trainers do
    assert_clean_error(run_main(evaluate.main, *sl, "--data-csv", shutil.copy(ad_cohort40, tmp_path), "--image-dir",
                                os.path.dirname(table.image_paths[0])), tmp_path / "crops.json", "does not fit")


def test_rows_whose_group_is_not_a_diagnosis_or_brain_age_rows_without_an_age_are_skipped_with_a_count(tmp_path,
                                                                                                      capsys):
    csv_path = tiny_ad(tmp_path, group="SMC")
    p = run_main(data.main, "check-ad", csv_path)
    assert p.returncode == 0 and "skipped 1 row whose Group is not CN, MCI or AD: SMC 1" in p.stdout, p.stderr
    assert "2 subjects (CN 0, MCI 0, AD 2)" in p.stdout
    p = run_main(data.main, "check-ad", csv_path, "--group-map", "smc=CN")
    assert p.returncode == 0 and "3 subjects (CN 1, MCI 0, AD 2)" in p.stdout and "skipped" not in p.stdout
    csv_path.write_text(csv_path.read_text().replace("S0,AD", "S0,SMC"))     # rows counted, not Group values
    p = run_main(data.main, "check-ad", csv_path, "--no-images")
    assert "skipped 2 rows whose Group is not CN, MCI or AD: SMC 2" in p.stdout, p.stdout + p.stderr
    ba = _tiny_brain_age(tmp_path)                                  # brain age: an empty Age is no target
    ba.write_text(ba.read_text().replace("B3,49,", "B3,,").replace("B6,58,", "B6,NA,"))
    table = data.read_brain_age_table(ba)
    assert table.subjects == [f"B{i}" for i in (0, 1, 2, 4, 5, 7, 8, 9)] and not np.isnan(table.age).any()
    assert capsys.readouterr().err == f"warning: {ba}: skipped 2 of 10 subjects whose Age is empty (the first: B3): " \
                                      f"no age to train or test on\n"
    assert len(data.read_brain_age_table(ba, for_prediction=True).subjects) == 10         # predict.py: Age optional


def test_adni_missing_codes_read_as_missing_with_a_warning_and_train_ad_refuses_an_impossible_value(tmp_path):
    csv_path = tiny_ad(tmp_path)
    good = csv_path.read_text()
    csv_path.write_text(good.replace(",>1700,", ",-4,").replace(",1.2\n", ",-1\n", 1))
    p = run_main(data.main, "check-ad", csv_path, "--no-images")
    assert p.returncode == 0 and p.stdout.startswith("ok:"), p.stderr
    warned = [w for w in p.stderr.strip().splitlines() if w.startswith("warning:")]
    assert any("ABETA: 3 cells" in w and "-4 or -1" in w for w in warned) and any("AV45: 1 cell " in w for w in warned)
    _, X = TabularPreprocessor.parse(data.read_ad_table(csv_path, need_images=False).raw)
    assert np.isnan(X[:, data.AD_CONTINUOUS.index("ABETA")]).all()
    assert np.isnan(X[0, data.AD_CONTINUOUS.index("AV45")]) and X[1, data.AD_CONTINUOUS.index("AV45")] == 1.2
    csv_path.write_text(good.replace(",71,", ",-4,").replace(",70.5,", ",,"))       # no subject's age known
    p = run_main(data.main, "check-ad", csv_path, "--no-images")
    assert p.returncode == 0 and "0 male, age unknown, empty cells: AGE 3 (100%)" in p.stdout, p.stdout + p.stderr
    csv_path.write_text(good)
    _cell(csv_path, "FDG", "-0.5")
    assert_clean_error(run_main(train_ad.main, *_tabular_args(csv_path, tmp_path / "runs")), "line 3", "column FDG")
    csv_path.write_text(good)
    _cell(csv_path, "AGE", "250")                                             # an age no one reaches
    assert_clean_error(run_main(train_ad.main, *_tabular_args(csv_path, tmp_path / "runs")), "line 3", "column AGE",
                       "impossible value '250' (expected 0 to 120)")
    assert not (tmp_path / "runs").exists()


def test_one_class_or_a_class_absent_from_a_subset_is_refused_after_the_split(ad_cohort40, tmp_path):
    out, n_ad = tmp_path / "runs", []
    one = _edit_table(ad_cohort40, tmp_path / "one.csv", lambda k, c: c[:1] + ["CN"] + c[2:])
    assert_clean_error(run_main(train_ad.main, *_tabular_args(one, out)), "one.csv", "every subject is CN")
    no_mci = _edit_table(ad_cohort40, tmp_path / "no_mci.csv",
                         lambda k, c: c[:1] + ["CN" if c[1] == "MCI" else c[1]] + c[2:])
    assert_clean_error(run_main(train_ad.main, *_tabular_args(no_mci, out)), "no MCI subjects", "--classes 2")
    few_ad = _edit_table(ad_cohort40, tmp_path / "few_ad.csv",
                         lambda k, c: c[:1] + ["CN" if c[1] == "AD" and n_ad.append(k) is None and len(n_ad) > 2
                                               else c[1]] + c[2:])
    assert_clean_error(run_main(train_ad.main, *_tabular_args(few_ad, out)), "few_ad.csv",
                       "class AD is absent from the", "split seed 0, fold 1", "2 AD subjects")
    assert not out.exists()


def test_numeric_options_out_of_range_are_refused_naming_the_option(tmp_path):
    csv_path = tiny_ad(tmp_path)
    head, o = tmp_path / "images" / "S0.nii.gz", tmp_path / "o.nii.gz"
    base = ["--data-csv", csv_path, "--out", tmp_path / "runs", "--model", "tabular", "--quiet"]
    for option, value in [("--batch-size", "0"), ("--lr", "-1"), ("--weight-decay", "nan"), ("--workers", "-1"),
                          ("--version", "-5"), ("--epochs", "0"), ("--split-seed", "-1"), ("--lr", "inf"),
                          ("--version", str(2 ** 31)), ("--split-seed", "35184372088832"),    # no seed torch takes
                          ("--workers", str(4 * training.cores() + 1))]:      # a typo would spawn processes unbounded
        assert_clean_error(run_main(train_ad.main, *base, option, value), f"{option} {value}")
    assert_clean_error(run_main(train_ad.main, *base, "--batch-size", "1"), "--batch-size 1", "at least 2")   # BN
    assert_clean_error(run_main(train_brain_age.main, "--data-csv", csv_path, "--batch-size", "0"), "at least 1")
    assert_clean_error(run_main(train_brain_age.main, "--data-csv", csv_path, "--lr", "0"), "--lr 0", "above 0")
    for fractions in (("0.5", "0.5", "0.5"), ("0.9", "0.1", "0"), ("nan", "0.5", "0.5")):
        assert_clean_error(run_main(train_brain_age.main, "--data-csv", csv_path, "--split", *fractions),
                           "--split " + " ".join(fractions))
    assert not (tmp_path / "runs").exists()
    for option, value in [("--spacing", "0.01"), ("--spacing", "50"), ("--spacing", "nan"), ("--shape", "0 9 9")]:
        assert_clean_error(run_main(preprocess.main, head, o, option, *value.split()), f"{option} {value}")
    assert_clean_error(run_main(preprocess.main, head, head), "S0.nii.gz", "overwrite its own input")
    assert not o.exists()
    assert_clean_error(run_main(evaluate.main, "brain-age", "--runs", tmp_path, "--top", "0"), "--top 0")
    for option in ("--split-seeds", "--versions"):           # a seed the trainers take, before a command is printed
        assert_clean_error(run_main(evaluate.main, "protocol", "--task", "ad", option, 2 ** 31, "--print-commands"),
                           f"{option} {2 ** 31}", "at most 2147483647")
    for task, option in (("ad", "--train-sex M"), ("ad", "--embedding-dim 2"), ("brain-age", "--binary"),
                         ("brain-age", "--tabular-epochs 5")):              # the other task's: refused, not ignored
        assert_clean_error(run_main(evaluate.main, "protocol", "--task", task, *option.split(), "--print-commands"),
                           option.split()[0], f"not of --task {task}'s")
    for option in ("--gpus 0,1", "--jobs 2"):             # the commands are printed, not run: given no GPU nor process
        assert_clean_error(run_main(evaluate.main, "protocol", "--task", "ad", *option.split(), "--print-commands"),
                           f"{option} with --print-commands")
    assert_clean_error(run_main(evaluate.main, "select-layers", "--task", "ad", "--seed", 2 ** 64), f"--seed {2 ** 64}")
    assert_clean_error(run_main(evaluate.main, "select-layers", "--task", "ad", "--data-csv", csv_path, "--draws", 1),
                       "--draws 1", "at least 2")              # one loss a layer: every entropy 0, a ranking of none
    assert_clean_error(run_main(lambda argv: np.zeros(1 << 62, np.uint8)), "Unable to allocate")   # one line too
    # argparse's own refusals are one line too (not its usage line first)
    assert_clean_error(run_main(train_ad.main, "--fold", "7"), "--fold", "invalid choice")
    assert_clean_error(run_main(train_brain_age.main, "--batch-size", "abc"), "--batch-size", "abc")
    assert_clean_error(run_main(train_brain_age.main, "--crops", "c.json"), "unrecognized", "--crops")  # AD's alone
    assert_clean_error(run_main(synthetic.main, "ad", "--out", tmp_path / "syn", "--seed", "-1"), "--seed -1")
    ba = _tiny_brain_age(tmp_path / "ba", sex="M")           # --train-sex with no such subjects in the training split
    assert_clean_error(run_main(train_brain_age.main, "--data-csv", ba, "--train-sex", "F", "--out", tmp_path / "r",
                                "--quiet"), "--train-sex F", "0 female subjects")
    assert not (tmp_path / "r").exists()
    # a folder for a file and a file for a folder, named as what they are
    assert_clean_error(run_main(train_ad.main, *base[2:], "--data-csv", tmp_path), "a folder, not a table")
    assert_clean_error(run_main(train_ad.main, *base[:2], "--out", csv_path), "--out", "a file, not a folder")
    assert_clean_error(run_main(train_ad.main, "--data-dir", csv_path, "--out", tmp_path / "r"), "--data-dir", "a file")
    assert_clean_error(run_main(evaluate.main, "protocol", "--task", "ad", "--runs", csv_path, "--print-commands"),
                       "--runs", "a file, not a folder")
    for option in ("--out", "--plots"):
        assert_clean_error(run_main(evaluate.main, "calibrate", tmp_path, option, csv_path), f"{option} {csv_path}",
                           "a file, not a folder")
    assert_clean_error(run_main(evaluate.main, "sweep", tmp_path, "--attribute", "Sex", "--values", "M"),
                       "not a run folder (no best.pt in it)")


def _rows_of(table, dst, *rows):
    """A table of tiny_ad's header and the rows given (each a function of tiny_ad's data lines)."""
    lines = table.read_text().splitlines()
    dst.write_text("\n".join([lines[0]] + [row(lines[1:]) for row in rows]) + "\n")
    return dst


def _case_twins(d, t):
    shutil.copy(d / "images" / "S0.nii.gz", d / "images" / "s0.nii.gz")
    return [_rows_of(t, d / "case.csv", lambda r: r[0], lambda r: r[1].replace("S1,", "s0,", 1)), "--out-dir", d / "pp"]


# (what is wrong, an edit of tiny_ad's folder and table returning the options after --csv, what the line names)
PREPROCESS_REFUSALS = [
    *[(f"subject {s}", lambda d, t, s=s: _sub(t, "S1,", f"{s},") or [t, "--out-dir", d / "pre"],
       ["ad.csv line 3", repr(s), "not a plain file name"]) for s in ("../escape", "/abs", "..")],
    ("--out-dir beside the table", lambda d, t: [t, "--out-dir", d], ["--out-dir", "overwrite", "ad.csv"]),
    ("--out-dir the images by a symlink", lambda d, t: os.symlink(d / "images", d / "link") or
     [t, "--out-dir", d / "link", "--overwrite"], ["ad.csv line 2", "would overwrite its own input"]),
    ("subjects equal but for case", _case_twins, ["case.csv line 3", "s0", "S0", "only in case"]),
    ("--column naming no column", lambda d, t: [t, "--out-dir", d / "pre", "--column", "T1_brain"],   # not images/
     ["ad.csv", "missing column T1_brain"]),
    ("--mask in batch mode", lambda d, t: [t, "--out-dir", d / "pre", "--mask", d / "images" / "S0.nii.gz"],
     ["--csv", "no --mask", "--mask-column"]),                                          # not left out silently
    *[(f"a subject of {len(s)} characters, 240 bytes", lambda d, t, s=s: [_rows_of(t, d / "long.csv", lambda r: r[0]
       .replace("S0,", s + ",")), "--out-dir", d / "pp"], ["long.csv line 2", "240 bytes long"])
      for s in ("S" * 240, "\u4e2d" * 80)],                                               # 80 of 3 bytes in UTF-8
]


@pytest.mark.parametrize("edit,names", [c[1:] for c in PREPROCESS_REFUSALS], ids=[c[0] for c in PREPROCESS_REFUSALS])
def test_preprocess_refuses_a_subject_that_is_not_a_plain_file_name_or_an_out_dir_that_would_overwrite_an_input(
        tmp_path, edit, names):
    """Refused in one line before anything is written (not a `File name too long` on a temp name)."""
    table = tiny_ad(tmp_path)
    argv = edit(tmp_path, table)
    before = {f: (tmp_path / f).read_bytes() for f in _files(tmp_path)}, sorted(os.listdir(tmp_path))
    assert_clean_error(run_main(preprocess.main, "--csv", *argv), *names)
    assert ({f: (tmp_path / f).read_bytes() for f in _files(tmp_path)}, sorted(os.listdir(tmp_path))) == before


def test_an_out_file_that_is_an_input_a_folder_or_a_pipe_is_refused_and_the_input_kept(ad_cohort60, ad_fold_runs,
                                                                                        tmp_path):
    """A device or a pipe (`--out /dev/null`) would be replaced by a regular file: as root, for the whole machine."""
    (tmp_path / "ADNIMERGE.csv").write_text(ADNIMERGE)
    os.makedirs(tmp_path / "sub")
    os.symlink(tmp_path, tmp_path / "sub" / "here")             # the same file by another path
    assert_clean_error(run_main(data.main, "from-adnimerge", tmp_path / "ADNIMERGE.csv", "--out",
                                tmp_path / "sub" / "here" / "ADNIMERGE.csv"), "would overwrite", "ADNIMERGE.csv")
    assert (tmp_path / "ADNIMERGE.csv").read_text() == ADNIMERGE
    assert_clean_error(run_main(data.main, "from-adnimerge", tmp_path / "ADNIMERGE.csv", "--out", tmp_path / "sub"),
                       "--out", "is a folder")
    run_dir = _run_dir(ad_fold_runs, "hyperfusion", 0)
    image = data.read_ad_table(ad_cohort60).image_paths[0]
    before = open(image, "rb").read()
    for out in (image, os.path.join(run_dir, "metrics.json"), tmp_path / "sub", f"{tmp_path / 'new'}{os.sep}"):
        assert_clean_error(run_main(predict.main, run_dir, "--data-csv", ad_cohort60, "--out", out, "--quiet"),
                           "--out", out)
    assert open(image, "rb").read() == before and no_temp_files(tmp_path / "sub") and not (tmp_path / "new").exists()
    os.mkfifo(tmp_path / "pipe")
    assert_clean_error(run_main(predict.main, run_dir, "--data-csv", ad_cohort60, "--out", tmp_path / "pipe",
                                "--quiet"), "--out", "pipe: not a regular file")
    with pytest.raises(UserError, match="pipe: not a regular file"), data.atomic_path(tmp_path / "pipe"):
        pass                                                  # every writer's last guard
    assert stat.S_ISFIFO(os.stat(tmp_path / "pipe").st_mode)


def test_a_preview_of_a_subject_named_like_a_path_stays_in_its_folder_under_a_distinct_safe_name(ad_cohort40, tmp_path):
    ids = ["../../x", "a/b", "s1", "S1", ".."]                  # possible with an image column
    table = _renamed(ad_cohort40, tmp_path / "t.csv", ids)
    pv = tmp_path / "one" / "two" / "pv"
    crops = os.path.join(os.path.dirname(ad_cohort40), "crops.json")
    p = run_main(data.main, "check-ad", table, "--crops", crops, "--preview", pv, "--preview-n", len(ids))
    assert p.returncode == 0 and "wrote 10 PNGs" in p.stdout, p.stderr
    assert "'../../x' as _.._x-" in p.stdout and "'S1' as S1-" in p.stdout and "'s1' as" not in p.stdout
    names = sorted(os.listdir(pv))
    assert _files(tmp_path) == sorted(["t.csv"] + [os.path.join("one", "two", "pv", n) for n in names])   # nothing out
    assert len({n.lower() for n in names}) == 10                # distinct on a case-insensitive file system too
    assert "s1_boxes.png" in names and not any(n.startswith(".") or "/" in n or "\\" in n for n in names)
    X, Y, Z = synthetic.AD_SYNTH["shape"]
    assert _png_size(pv / next(n for n in names if n.startswith("_.._x-") and n.endswith("_boxes.png"))) == \
        (2 * (X + 2), max(Y, Z))


def test_formula_ids_are_text_in_predictions_csv_and_the_code_reads_its_own_tables_back_unchanged(
        ad_cohort60, ad_fold_runs, tmp_path):
    ids = FORMULA_IDS + ["-4", "011_S_0001"]
    rows, _ = data.read_csv_rows(ad_cohort60, ("Subject",))
    os.makedirs(tmp_path / "images")
    for s, (_, r) in zip(ids, rows):                            # an ADNIMERGE export with these PTIDs
        shutil.copy(data.find_image(os.path.join(os.path.dirname(ad_cohort60), "images"), r["Subject"]),
                    tmp_path / "images" / f"{s}.nii.gz")
    adnimerge = [dict({a: r[a] for a in data.AD_ATTRIBUTES}, PTID=s, VISCODE="bl", DX_bl=r["Group"])
                 for s, (_, r) in zip(ids, rows)]
    data.write_csv(adnimerge, ["PTID", "VISCODE", "DX_bl"] + list(data.AD_ATTRIBUTES), tmp_path / "ADNIMERGE.csv")
    table, out = tmp_path / "t.csv", tmp_path / "predictions.csv"
    assert run_main(data.main, "from-adnimerge", tmp_path / "ADNIMERGE.csv", "--out", table).returncode == 0
    assert data.read_ad_table(table).subjects == ids            # the code's own table: ids come back as they were
    p = run_main(predict.main, _run_dir(ad_fold_runs, "hyperfusion", 0), "--data-csv", table, "--out", out, "--quiet")
    assert p.returncode == 0, p.stderr
    written, _ = data.read_csv_rows(out, ("Subject", "prob_CN"))
    cells = [r["Subject"] for _, r in written]
    assert cells == ["'" + s for s in FORMULA_IDS] + ["-4", "011_S_0001"]   # text in a spreadsheet; numbers kept
    assert [c[1:] if c.startswith("'") else c for c in cells] == ids          # one ' off gives every id back
    assert all(0 <= float(r["prob_CN"]) <= 1 for _, r in written)
    assert [data.spreadsheet_safe(v) for v in ("-1.5e3", "+7", -4, "\tx", "\r=1")] == ["-1.5e3", "+7", -4,
                                                                                         "'\tx", "'\r=1"]


def test_a_results_table_shows_a_model_folder_named_like_a_formula_as_text(tmp_path):
    rng = np.random.default_rng(0)
    for fold in range(4):
        fake_ad_run(tmp_path, "=1+1", 0, 0, fold, random_probs(rng, 30), np.arange(30) % 3)
    assert run_main(evaluate.main, "ad", "--runs", tmp_path, "--out", tmp_path / "res").returncode == 0
    lines = (tmp_path / "res" / "results_ad.csv").read_text().splitlines()
    assert lines[0].startswith("model,rows,") and lines[1].startswith("'=1+1,1,0."), lines[1]


def test_metrics_json_is_strict_json_with_null_where_a_metric_is_undefined(brain_age_cohort20, tmp_path):
    men = _edit_table(brain_age_cohort20, os.path.join(os.path.dirname(brain_age_cohort20), "men_only.csv"),
                      lambda k, c: c[:2] + ["M"] + c[3:])
    p = run_main(train_brain_age.main, "--data-csv", men, "--out", tmp_path, "--epochs", "1", "--batch-size", "8",
                 "--quiet", "--model", "imaging", "--split", "0.5", "0.25", "0.25")
    assert p.returncode == 0 and "warning:" in p.stderr and "no female subjects" in p.stderr, p.stderr
    strict = lambda text: json.loads(text, parse_constant=lambda name: pytest.fail(name))   # no bare NaN / Infinity
    saved = strict(open(os.path.join(training.brain_age_run_dir(tmp_path, "imaging", 0), "metrics.json")).read())
    assert saved["test"]["mae_female"] is None and saved["test"]["mae_male"] > 0
    data.write_json({"a": np.float32("nan"), "b": [np.inf, np.int64(3)], "c": np.array([1.5, np.nan])},
                    tmp_path / "x.json")
    assert strict((tmp_path / "x.json").read_text()) == {"a": None, "b": [None, 3], "c": [1.5, None]}


# ----------------------------------------------------------------------------------------------
# The program: faults and resume
# A run folder holds one run; resume ends as an uninterrupted run; divergence, Ctrl-C, SIGTERM, kill -9, a full disk
# or read-only storage stop in one line with the last good state kept.


def _full_disk_open(folder, error=errno.ENOSPC):
    """open() whose writes under `folder` fail with OSError(error) after 100 bytes (root ignores chmod)."""
    folder, real = os.path.abspath(folder), open

    def patched(file, mode="r", *args, **kwargs):
        f = real(file, mode, *args, **kwargs)
        if any(c in mode for c in "wax") and os.path.abspath(os.fspath(file)).startswith(folder + os.sep):
            def write(b, _write=f.write):
                _write(b[:100])
                raise OSError(error, os.strerror(error))
            f.write = write
        return f
    return patched


def _snapshot(folder):
    """{file: (bytes, modification time)} under folder: equal snapshots mean nothing was touched."""
    return {f: (open(os.path.join(folder, f), "rb").read(), os.stat(os.path.join(folder, f)).st_mtime_ns)
            for f in _files(folder)}


def _epoch_of(run_dir, name="last.pt"):
    return training.load_checkpoint(os.path.join(run_dir, name))["epoch"] + 1


def _stop_after_epoch(monkeypatch, epoch, stop=None):
    """training.write_log that calls stop() (raises KeyboardInterrupt if None) once the log holds `epoch` epochs."""
    real = training.write_log

    def write_log(history, path):
        real(history, path)
        if len(history) == epoch:
            if stop is None:
                raise KeyboardInterrupt
            stop()
    monkeypatch.setattr(training, "write_log", write_log)


def _under_signal(sig, call):
    """call() with SIGINT's handler Python's own (pytest in the background ignores it), SIGTERM's failing the test."""
    def unhandled(signum, frame):
        raise AssertionError(f"signal {signum} reached the test's handler")
    previous = signal.signal(sig, signal.default_int_handler if sig == signal.SIGINT else unhandled)
    try:
        return call()
    finally:
        signal.signal(sig, previous)


@pytest.fixture(scope="module")
def concat_run(ad_cohort60, tmp_path_factory):
    """A two-epoch concat run -> (its metrics, its folder, (subjects, item[0].shape[:2]) of each loader scored)."""
    out, scored, real = tmp_path_factory.mktemp("concat"), [], train_ad.ad_metrics

    def spy(model, loader, *args):
        scored.append((len(loader.dataset), loader.dataset[0][0].shape[:2]))
        return real(model, loader, *args)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_ad, "ad_metrics", spy)
        metrics = train_ad.main(_ad_args(ad_cohort60, out, "--model", "concat"))
    return metrics, _run_dir(out, "concat"), scored


@pytest.fixture(scope="module")
def tabular_run(ad_cohort60, tmp_path_factory):
    """The --out of a finished one-epoch tabular run (fold 1) at the default precision; tests work on copies."""
    out = tmp_path_factory.mktemp("tabular")
    train_ad.main(["--data-csv", str(ad_cohort60), "--out", str(out), "--model", "tabular", "--epochs", "1",
                   "--batch-size", "8", "--quiet", "--split-seed", "0", "--fold", "1"])
    return out


def _copy_of(tabular_run, tmp_path):
    shutil.copytree(tabular_run, tmp_path, dirs_exist_ok=True)
    return _run_dir(tmp_path, "tabular")


def test_resume_after_an_interruption_ends_as_an_uninterrupted_run_from_the_saved_adam_moments(
        ad_cohort60, concat_run, tmp_path, monkeypatch):
    """last.pt holds Adam's moments and step count beside the weights: a resumed run steps on from them (a fresh Adam
    would restart its moments and bias correction) and ends exactly as the run never stopped."""
    _stop_after_epoch(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        train_ad.main(_ad_args(ad_cohort60, tmp_path, "--model", "concat"))
    monkeypatch.undo()
    assert _epoch_of(_run_dir(tmp_path, "concat")) == 1
    assert train_ad.main(_ad_args(ad_cohort60, tmp_path, "--model", "concat", "--resume")) == concat_run[0]
    a, b = (training.load_checkpoint(os.path.join(d, "last.pt")) for d in (_run_dir(tmp_path, "concat"), concat_run[1]))
    assert a["epoch"] == b["epoch"] == 1 and a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in b["model"]), "weights differ"
    moments = lambda ckpt: [(k, s[k]) for s in ckpt["optimizer"]["state"].values() for k in sorted(s)]
    assert len(moments(a)) == len(moments(b)) > 0
    assert all(ka == kb and torch.equal(va, vb) for (ka, va), (kb, vb) in zip(moments(a), moments(b)))


def _unfinish(run_dir, *more):
    for f in (*training.FINISHED_FILES, *more):
        os.remove(os.path.join(run_dir, f))


def _trained_at_bf16(run_dir):                                    # as if trained at bfloat16 on a GPU
    ckpt = training.load_checkpoint(os.path.join(run_dir, "last.pt"))
    training.save_checkpoint({**ckpt, "run": {**ckpt["run"], "precision": "bf16"}}, os.path.join(run_dir, "last.pt"))


NEW_RUN, OTHER = ("--epochs", "1", "--lr", "2e-3"), ["{run}/last.pt", "belongs to another run"]


@pytest.mark.parametrize("edit, options, says", [
    (None, NEW_RUN, ["{run}", "holds a finished run", "metrics.json", "--resume", "another --out"]),
    (_unfinish, NEW_RUN, ["{run}", "unfinished run (last.pt after epoch 1)", "--resume", "another --out"]),
    (lambda d: _unfinish(d, "last.pt"), NEW_RUN + ("--resume",), ["{run}", "no last.pt", "best.pt"]),
    (lambda d: data.write_text("PK\x03\x04 not really a checkpoint", os.path.join(d, "last.pt")), ("--resume",),
     ["{run}/last.pt", "corrupt or unreadable checkpoint"]),
    (None, ("--resume", "--lr", "2e-3"), OTHER + ["lr: checkpoint 0.0001, now 0.002"]),
    (_trained_at_bf16, ("--resume",), OTHER + ["precision: checkpoint 'bf16', now 'fp32'"])],
    ids=["finished", "unfinished", "nothing-to-resume", "corrupt", "lr", "precision"])
def test_a_run_folder_is_refused_to_a_new_run_or_a_resume_it_cannot_serve_naming_why_before_any_file_changes(
        ad_cohort60, tabular_run, tmp_path, edit, options, says):
    run_dir = _copy_of(tabular_run, tmp_path)
    if edit:
        edit(run_dir)
    before = _snapshot(tmp_path)                                  # no lock file, no checkpoint, nothing left
    assert_clean_error(run_main(train_ad.main, *_tabular_args(ad_cohort60, tmp_path, *options)),
                       *(s.replace("{run}", run_dir) for s in says))
    assert _snapshot(tmp_path) == before


def test_a_resumed_run_that_trains_further_never_leaves_the_old_metrics_beside_its_new_checkpoints(
        ad_cohort60, tabular_run, tmp_path, monkeypatch):
    """metrics.json and predictions.npz go before the first new epoch; --epochs may grow on --resume, not shrink."""
    run_dir = _copy_of(tabular_run, tmp_path)
    _stop_after_epoch(monkeypatch, 2)
    p = run_main(train_ad.main, *_tabular_args(ad_cohort60, tmp_path, "--epochs", "3", "--resume"))
    assert p.returncode == 130 and p.stderr.startswith("interrupted (Ctrl-C) in epoch 3 of 3: ") and \
        f"{run_dir}/last.pt holds epoch 2" in p.stderr and len(p.stderr.splitlines()) == 1, p.stderr
    assert _epoch_of(run_dir) == 2 and not {"metrics.json", "predictions.npz"} & set(os.listdir(run_dir))
    with pytest.raises(UserError, match="no finished run"):
        predict.find_runs([run_dir])
    monkeypatch.undo()
    assert_clean_error(run_main(train_ad.main, *_tabular_args(ad_cohort60, tmp_path, "--epochs", "1", "--resume")),
                       "--epochs 1", "trained 2 epochs", "may grow but not shrink")
    train_ad.main(_tabular_args(ad_cohort60, tmp_path, "--epochs", "3", "--resume"))
    assert set(training.RUN_FILES) == set(os.listdir(run_dir)) and _epoch_of(run_dir) == 3
    assert [r.dir for r in predict.find_runs([run_dir])] == [run_dir]


def test_a_folder_in_use_by_a_live_process_is_refused_and_a_killed_one_leaves_no_stuck_lock(ad_cohort60, tmp_path):
    """The lock is an flock, which the OS drops with its process: kill -9 leaves none stuck, and the next run of the
    folder removes the temporary file of the write it cut short (a partial last.pt, 46 MB for HyperFusion)."""
    run_dir, args = _run_dir(tmp_path, "tabular"), _tabular_args(ad_cohort60, tmp_path, "--epochs", "1")
    with training.claim_run_folder(run_dir, resume=False):        # held by this process (another open file)
        assert_clean_error(run_main(train_ad.main, *args), run_dir, "in use by another training process",
                           f"pid {os.getpid()}", "another --out")
    assert os.listdir(tmp_path) == []                             # released, it removed every folder it made
    os.makedirs(run_dir)
    lock = os.path.join(run_dir, training.LOCK_NAME)
    hold = "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); " \
           "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, b'pid %d on test' % os.getpid()); " \
           "print('held', flush=True); time.sleep(120)"
    holder = subprocess.Popen([sys.executable, "-c", hold, lock], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert_clean_error(run_main(train_ad.main, *args, "--resume"), run_dir, f"pid {holder.pid} on test")
    finally:
        holder.kill()                                             # SIGKILL: no clean-up of its own
        holder.wait()
        holder.stdout.close()
    assert os.path.isfile(lock)                                   # its file stays, its lock went with it
    data.write_text("a checkpoint cut short", os.path.join(run_dir, ".tmp-0123456789ab-last.pt"))   # and its write
    train_ad.main(args)
    assert sorted(os.listdir(run_dir)) == sorted(training.RUN_FILES)   # trained; the lock file removed at its end


def test_hyperfusion_continues_an_interrupted_pre_training_of_its_tabular_mlp(ad_cohort60, tmp_path, monkeypatch):
    """The MLP (Sec. 4.3.6) pre-trains in a folder of its own: the next HyperFusion run resumes it there."""
    tabular_dir = _run_dir(tmp_path, "tabular")
    _stop_after_epoch(monkeypatch, 1)
    p = run_main(train_ad.main, *_ad_args(ad_cohort60, tmp_path))
    assert p.returncode == 130 and f"{tabular_dir}/last.pt holds epoch 1" in p.stderr, p.stderr
    monkeypatch.undo()
    _initial_weights(train_ad, _ad_args(ad_cohort60, tmp_path), monkeypatch, pretrained=models.TabularMLP)
    assert _epoch_of(tabular_dir) == 2 and os.path.isfile(os.path.join(tabular_dir, "metrics.json"))


@pytest.mark.parametrize("poison, says", [
    ("training loss", "the training loss is nan (step 1 of 4)"),
    ("validation outputs", "validation outputs are nan for 12 of 12 subjects"),
    ("batchnorm", "BatchNorm running statistic embedding.1.running_var is inf after the epoch's steps")],
    ids=["training-loss", "validation-outputs", "batchnorm"])
def test_a_non_finite_loss_output_or_batchnorm_statistic_stops_the_run_naming_the_epoch_with_the_last_good_kept(
        ad_cohort60, tmp_path, monkeypatch, poison, says):
    """Epoch 2 poisoned (1e30 voxels gave an infinite BatchNorm variance with a finite loss); epoch 1 kept."""
    calls = []
    if poison == "training loss":                 # 36 training subjects, batches of 8: 4 steps an epoch
        real_loss = train_ad.wce_loss
        monkeypatch.setattr(train_ad, "wce_loss", lambda *a: calls.append(1) or real_loss(*a) * (
            float("nan") if len(calls) > 4 else 1.0))
    elif poison == "validation outputs":
        real_predict = train_ad.predict

        def nan_in_epoch_2(*args):
            calls.append(1)
            out, targets = real_predict(*args)
            return out * (float("nan") if len(calls) == 2 else 1.0), targets
        monkeypatch.setattr(train_ad, "predict", nan_in_epoch_2)
    else:
        real_forward = nn.BatchNorm1d.forward

        def forward(self, x):                     # the tabular MLP's one BatchNorm1d
            out = real_forward(self, x)
            calls.append(self.training)
            if self.training and calls.count(True) == 6:     # epoch 2, step 2; a new tensor (autograd's is the old)
                self.running_var = self.running_var.clone().fill_(float("inf"))
            return out
        monkeypatch.setattr(nn.BatchNorm1d, "forward", forward)
    run_dir = _run_dir(tmp_path, "tabular")
    assert_clean_error(run_main(train_ad.main, *_tabular_args(ad_cohort60, tmp_path, "--epochs", "3")), run_dir,
                       "diverged in epoch 2", says, "last.pt still holds epoch 1")
    assert sorted(os.listdir(run_dir)) == ["best.pt", "last.pt", "log.csv"]
    for name in ("last.pt", "best.pt"):
        ckpt = training.load_checkpoint(os.path.join(run_dir, name))
        assert ckpt["epoch"] == 0 and all(torch.isfinite(v).all() for v in ckpt["model"].values()), name
    assert poison != "training loss" or len(calls) == 8          # epoch 2's steps end first
    if poison == "validation outputs":                            # a score of nan, from fit itself
        with pytest.raises(UserError, match=r"diverged in epoch 2: the validation score \(score\) is nan"):
            _scripted_fit(tmp_path / "scripted", [0.5, float("nan")], False)


def test_a_nan_batchnorm_statistic_after_brain_ages_precise_bn_stops_the_run_with_epoch_1_kept(tmp_path):
    net, calls = _TabularNet(), []                            # fit as train_brain_age.py calls it, on a tiny net
    net.norm = nn.BatchNorm1d(2)
    items = torch.utils.data.TensorDataset(torch.zeros(16, 0), torch.randn(16, 3), torch.randn(16, 2))
    batches = torch.utils.data.DataLoader(items, batch_size=8)
    run = RunConfig(task="brain-age", model="imaging", version=0, split_seed=0, data_csv="x", epochs=3, batch_size=8,
                    lr=1e-3, weight_decay=0.0)

    def precise_bn_nan_in_epoch_2(model):
        training.recalibrate_batchnorm(model, batches, torch.device("cpu"))
        calls.append(1)
        if len(calls) == 2:
            model.norm.running_mean.fill_(float("nan"))

    with pytest.raises(UserError, match=r"diverged in epoch 2: the BatchNorm running statistic norm\.running_mean is "
                                        r"nan after the precise-BN re-estimation; last\.pt still holds epoch 1"):
        training.fit(net, batches, F.mse_loss, lambda m: {"mae": 1.0}, "mae", run, str(tmp_path), {}, quiet=True,
                     lower_is_better=True, before_validation=precise_bn_nan_in_epoch_2)
    assert _epoch_of(tmp_path) == 1


def test_a_loss_a_million_times_the_untrained_networks_stops_the_run_though_finite(ad_cohort60, tmp_path):
    """--lr 1e3: the MLP's first epoch at 2e9 against an untrained 1.3; it once finished at 4e17 without a word."""
    p = run_main(train_ad.main, *_tabular_args(ad_cohort60, tmp_path, "--epochs", "2", "--lr", "1e3"))
    assert_clean_error(p, "diverged in epoch 1", "the training loss", "times the untrained network's",
                       "nothing was saved")
    assert _files(tmp_path) == []


def test_under_torchrun_the_epochs_loss_is_every_processs_sample_mean_and_the_untrained_ones_their_first_batches(
        tmp_path, monkeypatch):
    """Two processes: 4 samples at loss 1 here, 4 at loss 3 there, their first batches 1 and 3."""
    monkeypatch.setattr(training, "world_size", lambda: 2)
    monkeypatch.setattr(training, "everyone", lambda mine: [mine, (12.0, 4, 3.0) if isinstance(mine, tuple) else None])
    assert training.check_losses([torch.tensor(1.0)], [4], 0, None, str(tmp_path), -1) == (2.0, 2.0)


@pytest.mark.parametrize("sig, name", [(signal.SIGINT, "Ctrl-C"), (signal.SIGTERM, "SIGTERM")],
                         ids=["ctrl-c", "sigterm"])
def test_ctrl_c_or_sigterm_during_training_prints_one_line_with_what_is_kept_and_the_command_to_resume(
        ad_cohort60, tmp_path, monkeypatch, sig, name):
    """Exit 128 + the signal, as a shell reports it; while it trains, its folder is refused to a second run."""
    args, run_dir, second = _tabular_args(ad_cohort60, tmp_path, "--epochs", "3"), _run_dir(tmp_path, "tabular"), []

    def second_run_then_the_signal():
        second.append(run_main(train_ad.main, *args, "--resume"))
        os.kill(os.getpid(), sig)

    _stop_after_epoch(monkeypatch, 1, second_run_then_the_signal)
    monkeypatch.setattr(sys, "argv", ["train_ad.py"])
    with contextlib.redirect_stderr(io.StringIO()) as err, pytest.raises(SystemExit) as end:
        _under_signal(sig, lambda: data.run_cli(train_ad.main, args, resume_option="--resume"))   # its __main__
    assert_clean_error(second[0], run_dir, "in use by another training process", f"pid {os.getpid()}")
    command = shlex.join([sys.executable, "train_ad.py", *args, "--resume"])
    assert end.value.code == 128 + sig and err.getvalue() == f"interrupted ({name}) in epoch 2 of 3: {run_dir}/" \
        f"last.pt holds epoch 1; resume with: {command}\n", err.getvalue()
    assert _epoch_of(run_dir) == 1 and training.LOCK_NAME not in os.listdir(run_dir)


def test_a_gpu_out_of_memory_is_one_error_line_naming_the_batch_size_and_last_pt_keeps_the_last_epoch(
        ad_cohort60, tmp_path, monkeypatch):
    """torch.OutOfMemoryError (CUDA's) is no MemoryError: it was a traceback."""
    def out_of_memory():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.")
    _stop_after_epoch(monkeypatch, 1, out_of_memory)
    p = run_main(train_ad.main, *_tabular_args(ad_cohort60, tmp_path, "--epochs", "3"))
    assert_clean_error(p, "error: CUDA out of memory. Tried to allocate 2.00 GiB.; a smaller --batch-size needs less")
    assert _epoch_of(_run_dir(tmp_path, "tabular")) == 1


def test_a_full_disk_or_an_unwritable_folder_is_one_error_line_naming_the_folder_and_the_bytes(
        ad_cohort40, tmp_path, monkeypatch):
    """ENOSPC (a full --cache-dir or --out) or EACCES, or an --out under a file: nothing left behind."""
    cache_dir, runs = tmp_path / "cache", tmp_path / "runs"
    monkeypatch.setattr(data, "open", _full_disk_open(cache_dir), raising=False)
    proc = run_main(train_ad.main, *_ad_args(ad_cohort40, runs, "--model", "imaging", "--cache-dir", cache_dir))
    proc.stderr = "".join(line for line in proc.stderr.splitlines(True)                   # the hashes' index
                          if not (line.startswith("warning: ") and "sources.json" in line))
    assert_clean_error(proc, f"{cache_dir}: no space left to write", ".npy", "No space left on device")
    assert re.search(r"it needs \d+ bytes", proc.stderr), proc.stderr
    assert not [f for f in os.listdir(cache_dir) if f.endswith(".npy")] and no_temp_files(cache_dir)
    run_dir = _run_dir(runs, "tabular")
    for error, says in ((errno.ENOSPC, "no space left to write best.pt"), (errno.EACCES, "cannot write best.pt")):
        monkeypatch.setattr(data, "open", _full_disk_open(runs, error), raising=False)
        proc = run_main(train_ad.main, *_ad_args(ad_cohort40, runs, "--model", "tabular"))
        assert_clean_error(proc, f"{run_dir}: {says}", os.strerror(error))
        assert re.search(r"it needs \d+ bytes", proc.stderr), proc.stderr
        assert not os.path.exists(run_dir) or os.listdir(run_dir) == []   # no checkpoint, log or temporary file

    def full_after_best(blob, path):   # the first best.pt written, then the disk full: its best.pt went too (or
        with pytest.MonkeyPatch.context() as mp:   # the rerun was refused: "holds another run's best.pt")
            if path.endswith("last.pt"):
                mp.setattr(data, "open", _full_disk_open(runs), raising=False)
            data.write_bytes(blob, path)
    monkeypatch.setattr(data, "open", open, raising=False)
    monkeypatch.setattr(training, "write_bytes", full_after_best)
    assert_clean_error(run_main(train_ad.main, *_ad_args(ad_cohort40, runs, "--model", "tabular")),
                       f"{run_dir}: no space left to write last.pt")
    assert not os.path.exists(run_dir)
    monkeypatch.undo()
    (tmp_path / "a_file").write_text("")
    assert_clean_error(run_main(train_ad.main, *_ad_args(ad_cohort40, tmp_path / "a_file" / "runs", "--model",
                                                         "tabular")), tmp_path / "a_file", "Not a directory")


@pytest.mark.parametrize("cache", ["absent", "present"])
def test_a_cohort_on_read_only_storage_stops_in_one_line_naming_cache_dir_and_trains_with_a_writable_one(
        ad_cohort40, tmp_path, monkeypatch, capsys, cache):
    """<csv folder>/cache cannot be made (or written): one line names it and --cache-dir, with which it trains."""
    ro = tmp_path / "archive"
    shutil.copytree(os.path.dirname(ad_cohort40), ro, ignore=shutil.ignore_patterns("cache"))
    if cache == "present":
        os.mkdir(ro / "cache")
    real_mkdir = os.mkdir

    def read_only_mkdir(path, *args, **kwargs):
        if os.path.abspath(os.fspath(path)).startswith(str(ro) + os.sep):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", read_only_mkdir)
    monkeypatch.setattr(data, "open", _full_disk_open(ro, errno.EROFS), raising=False)
    args = _ad_args(ro / os.path.basename(ad_cohort40), tmp_path / "runs", "--model", "imaging", "--epochs", "1")
    proc = run_main(train_ad.main, *args)
    *warned, error = proc.stderr.splitlines()            # present: sources.json not written, a warning says so
    assert all(w.startswith("warning: ") and "sources.json" in w for w in warned), warned
    assert bool(warned) == (cache == "present"), warned
    assert_clean_error(types.SimpleNamespace(returncode=proc.returncode, stderr=error), ro / "cache",
                       "Read-only file system", "--cache-dir")
    assert not os.path.exists(os.path.join(_run_dir(tmp_path / "runs", "imaging"), "best.pt"))
    assert os.listdir(ro / "cache") == [] if cache == "present" else not os.path.exists(ro / "cache")
    if cache == "absent":                                # the way out, once: it decodes and starts training
        _initial_weights(train_ad, args + ["--cache-dir", str(tmp_path / "cache")], monkeypatch)
        assert capsys.readouterr().err == ""


def test_a_command_piped_into_head_stops_quietly_when_head_has_read_enough(tmp_path):
    """`run-protocol --print-commands | head -1` printed `error: [Errno 32] Broken pipe`."""
    p = subprocess.run(f"{shlex.quote(sys.executable)} evaluate.py protocol --task ad --split-seeds 0 1 2 3 4 5 "
                       f"--versions 0 1 2 3 4 5 6 7 8 9 --runs "           # 1,440 lines: more than a pipe holds
                       f"{shlex.quote(str(tmp_path))} --print-commands | head -1", shell=True, cwd=HERE,
                       capture_output=True, text=True)
    assert p.stdout.startswith("python train_ad.py --model ") and len(p.stdout.splitlines()) == 1
    assert p.stderr == "", p.stderr


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_or_sigterm_during_a_cache_decode_is_one_line_and_leaves_nothing_half_written(
        ad_cohort40, tmp_path, monkeypatch, sig):
    real_open, signals = open, [sig]

    def slow_open(file, mode="r", *args, **kwargs):       # the first entry's first half written, then the signal
        f = real_open(file, mode, *args, **kwargs)
        if "w" in mode and ".npy" in os.fspath(file):
            def write(blob, _write=f.write):
                n = _write(blob[:len(blob) // 2])
                if signals:
                    os.kill(os.getpid(), signals.pop())
                return n + _write(blob[len(blob) // 2:])
            f.write = write
        return f

    monkeypatch.setattr(data, "open", slow_open, raising=False)
    folder = os.path.join(os.path.dirname(ad_cohort40), "images")
    paths = sorted(os.path.join(folder, f) for f in os.listdir(folder))
    proc = _under_signal(sig, lambda: run_main(lambda argv: data.ImageCache(paths, str(tmp_path / "cache")).prepare(
        progress=False)))
    assert proc.returncode == 128 + sig and len(proc.stderr.splitlines()) == 1, proc.stderr   # exit 2 said bad input
    assert re.match(rf"interrupted \((Ctrl-C|SIGTERM)\) while decoding the image cache {tmp_path / 'cache'}: \d+ of "
                    r"40 images decoded and kept, none half-written; run again with: ", proc.stderr), proc.stderr
    assert int(re.search(r"(\d+) of 40 images decoded", proc.stderr).group(1)) < 40   # stopped, not waited for
    assert no_temp_files(tmp_path / "cache")


# ----------------------------------------------------------------------------------------------
# The program: predict.py
# New patients through every member with its own saved state, combined by Eq. 7-8 or Eq. 6.


@pytest.fixture(scope="module")
def fold_predictions(ad_cohort60, ad_fold_runs, tmp_path_factory):
    """predict.py on ad_fold_runs' two HyperFusion folds -> (its result, the runs, the CSV it wrote)."""
    runs = [_run_dir(ad_fold_runs, "hyperfusion", fold) for fold in (0, 1)]
    out = tmp_path_factory.mktemp("predict") / "p.csv"
    return _predict(os.path.dirname(runs[0]), "--data-csv", ad_cohort60, "--out", out), runs, out


def test_a_finished_run_predicts_its_test_set_again_from_its_saved_state(concat_run, tmp_path):
    """Validation and test read both hippocampi; the saved model, imputation and crops give the test set again."""
    _, run_dir, scored = concat_run
    assert scored == [(12, (2, 1))] * 3       # validation (subset 1) after each of 2 epochs, test (subset 4)
    finished = load_run(run_dir)
    assert finished.run.model == "concat" and finished.run.fold == 1 and finished.crops is not None
    _, table, test_idx, images = predict.test_set(finished)
    tab = finished.tabular.transform([table.raw[i] for i in test_idx])      # the run's own imputation
    loader = torch.utils.data.DataLoader(data.ADDataset(images, tab, table.labels[test_idx], train=False), 8)
    _, probs = train_ad.ad_metrics(finished.model(), loader, torch.device("cpu"), finished.class_names,
                                   finished.run.precision)
    np.testing.assert_allclose(probs, finished.read_predictions()["probs"], atol=1e-6)
    edited = tmp_path / "ad.csv"                                              # another table: another test set
    edited.write_text(open(finished.run.data_csv).read() + "\n")
    with pytest.raises(UserError, match="ad.csv: not the table .*best.pt was trained on"):
        predict.test_set(finished, data_csv=str(edited))


def test_a_brain_age_run_rebuilds_its_own_split_not_sec_4_2_3s_default(fig4a_women_run):
    table, (_, val, test), _, run_dir = fig4a_women_run                        # trained with --split 0.5 0.25 0.25
    finished = load_run(run_dir)
    for part, rows in (("val", val), ("test", test)):
        assert np.array_equal(predict.test_set(finished, part=part)[2], rows)
    assert not np.array_equal(test, data.brain_age_split(table.age, table.sex, 0)[2])    # 80/10/10 would differ


def test_each_member_reads_the_images_through_its_own_crops(ad_fold_runs, ad_cohort60, tmp_path):
    first = _run_dir(ad_fold_runs, "hyperfusion", 0)
    moved = tmp_path / "moved" / "v0"
    shutil.copytree(first, moved)
    ckpt = torch.load(moved / "best.pt", weights_only=True)
    ckpt["inputs"]["crops"]["left_start"][0] += 2                              # the left box 2 voxels along x
    torch.save(ckpt, moved / "best.pt")
    alone = _predict(moved, "--data-csv", ad_cohort60, "--out", tmp_path / "alone.csv")["outputs"][0]
    both = _predict(first, moved, "--data-csv", ad_cohort60, "--out", tmp_path / "both.csv")["outputs"]
    np.testing.assert_allclose(both[1], alone, atol=1e-6)
    assert not np.allclose(both[0], both[1], atol=1e-4)                        # the same weights, other images


def test_predict_combines_the_members_by_eq7_8_each_reproducing_its_test_predictions_and_writes_their_spread(
        fold_predictions):
    """prob_spread: the largest across-member standard deviation of a class probability, not the mean over classes."""
    both, runs, out = fold_predictions
    assert both["members"] == runs and len(both["subjects"]) == 60
    members = both["outputs"]                                               # (K, N, C)
    np.testing.assert_allclose(both["combined"], _eq7_8_by_hand(members), atol=1e-6)       # Eq. 7-8
    assert not np.allclose(both["combined"], members.mean(0), atol=1e-5)         # not the plain mean
    for r, member in zip(runs, members):
        saved = load_run(r).read_predictions()
        rows = [both["subjects"].index(s) for s in saved["subjects"]]
        np.testing.assert_allclose(member[rows], saved["probs"], atol=1e-5)
    lines = out.read_text().splitlines()
    assert lines[0] == "Subject,prob_CN,prob_MCI,prob_AD,predicted,n_models,prob_spread" and len(lines) == 61
    assert lines[1].split(",")[5] == "2"
    written = list(csv.DictReader(open(out)))                               # each subject's class: its largest
    assert [r["predicted"] for r in written] == [NAMES[int(p.argmax())] for p in both["combined"]]
    assert len({r["predicted"] for r in written}) > 1
    by_hand = [max(np.std([m[i, c] for m in members]) for c in range(members.shape[2]))
               for i in range(members.shape[1])]
    np.testing.assert_allclose(both["spread"], by_hand, rtol=1e-12)
    np.testing.assert_allclose([float(r["prob_spread"]) for r in written], by_hand, atol=1e-6)
    assert not np.allclose(by_hand, members.std(0).mean(1), atol=1e-4)     # not the mean over the classes


def test_predict_prints_the_ensembles_metrics_over_the_subjects_with_a_diagnosis_alone_an_auc_only_if_defined(
        ad_cohort60, tabular_run, tmp_path, capsys):
    table = _edit_table(ad_cohort60, tmp_path / "new.csv", lambda k, c: c[:1] + [c[1] if k > 11 else ""] + c[2:])
    res = predict.main([_run_dir(tabular_run, "tabular"), "--data-csv", str(table), "--out", str(tmp_path / "p.csv")])
    labels = data.read_ad_table(table, need_images=False, for_prediction=True).labels
    known = labels >= 0
    m = classification_metrics(labels[known], res["combined"][known], NAMES)
    assert f"ensemble on the {known.sum()} subjects with a diagnosis: BA {m['balanced_accuracy']:.3f} AUC " \
           f"{m['auc_macro']:.3f}" in capsys.readouterr().out and known.sum() == 50
    no_ad = _edit_table(ad_cohort60, tmp_path / "no_ad.csv", lambda k, c: [c[0], c[1] * (c[1] != "AD")] + c[2:])
    predict.main([_run_dir(tabular_run, "tabular"), "--data-csv", str(no_ad), "--out", str(tmp_path / "q.csv")])
    assert " AUC undefined (a class has no subject) F1 " in capsys.readouterr().out        # not "nan"


def test_a_prediction_depends_on_its_own_row_only_and_empty_cells_or_absent_columns_use_the_runs_saved_imputation(
        ad_cohort60, ad_fold_runs, tmp_path, capsys):
    """A new patient has no diagnosis; a table may leave out attribute columns: read as empty cells, said."""
    rows = [line.split(",") for line in open(ad_cohort60).read().splitlines()[:9]]     # the header, 8 patients
    for col in ("AGE", "ABETA", "PTAU", "TAU", "FDG", "AV45"):
        rows[5][rows[0].index(col)] = ""
    gone = [rows[0].index(c) for c in ("Group", "AGE", "AV45")]
    everyone, one = (os.path.join(os.path.dirname(ad_cohort60), f"new_{n}.csv") for n in ("all", "one"))
    for path, lines, left_out in ((everyone, rows, gone[:1]), (one, [rows[0], rows[5]], gone)):
        data.write_text("".join(",".join(c for i, c in enumerate(r) if i not in left_out) + "\n" for r in lines), path)
    run_dir = _run_dir(ad_fold_runs, "hyperfusion", 0)
    a = _predict(run_dir, "--data-csv", everyone, "--out", tmp_path / "a.csv")
    b = _predict(run_dir, "--data-csv", one, "--out", tmp_path / "b.csv")
    np.testing.assert_allclose(a["combined"][4], b["combined"][0], atol=1e-6)
    assert "new_one.csv: no column AGE, AV45: read as empty for every subject" in capsys.readouterr().err
    assert_clean_error(run_main(train_ad.main, *_tabular_args(one, tmp_path / "r")), "missing columns Group, AGE, AV45")
    finished_run = load_run(run_dir)                                        # by hand: the run's own state
    table = data.read_ad_table(one, for_prediction=True)
    tab = finished_run.tabular.transform(table.raw)
    assert np.isfinite(tab).all() and tab[0, finished_run.tabular.columns.index("ABETA_missing")] == 1
    image = torch.as_tensor(np.array(finished_run.crops(data.load_volume(table.image_paths[0])), np.float32))
    assert finished_run.run.precision == "fp32"                             # the same arithmetic both ways
    with torch.no_grad():
        logits = finished_run.model()(image[:, None], torch.as_tensor(tab).repeat(2, 1))    # both hippocampi
    np.testing.assert_allclose(b["combined"][0], torch.softmax(logits, 1).mean(0).numpy(), rtol=1e-5, atol=1e-7)


def test_predict_reads_each_brain_age_member_with_its_own_target_and_corrects_the_eq6_means_gap_by_the_mean_fit(
        brain_age_cohort20, fig4a_women_run, tmp_path):
    """Copies of one run, targets centred 0, 10 and 40 years apart, each with its own age-bias fit: the ensemble is
    their mean, not median; the fit of a mean prediction on one validation set is the mean of the members' fits (a line
    fitted by least squares is linear in the predictions). Scans without an Age get empty gaps, the others theirs."""
    fits = []
    for k, shift in enumerate((0.0, 10.0, 40.0)):
        member = tmp_path / "runs" / f"member{k}"
        shutil.copytree(fig4a_women_run[3], member)
        ckpt = training.load_checkpoint(str(member / "best.pt"))
        ckpt["target"] = dict(ckpt["target"], centre=ckpt["target"]["centre"] + shift)
        training.save_checkpoint(ckpt, str(member / "best.pt"))
        saved = json.loads((member / "metrics.json").read_text())
        fits.append({"intercept": saved["age_bias"]["intercept"] + shift, "slope": 0.1 * k})
        data.write_json(dict(saved, age_bias=dict(saved["age_bias"], **fits[-1])), member / "metrics.json")
    rows = list(csv.DictReader(open(brain_age_cohort20)))
    some = os.path.join(os.path.dirname(brain_age_cohort20), "some_ages.csv")    # beside it: the same images
    data.write_csv([dict(r, Age="" if k % 3 == 0 else r["Age"]) for k, r in enumerate(rows)], rows[0].keys(), some)
    res = _predict(tmp_path / "runs", "--data-csv", some, "--out", tmp_path / "ages.csv")
    out = res["outputs"]                                                    # (3, N) years
    assert out.shape == (3, 20)
    np.testing.assert_allclose(out[1] - out[0], 10.0, atol=1e-4)
    np.testing.assert_allclose(out[2] - out[0], 40.0, atol=1e-4)
    np.testing.assert_allclose(res["combined"], out[0] + 50.0 / 3, atol=1e-4)      # Eq. 6, the median 10 above
    np.testing.assert_allclose(res["combined"], metrics.mean_ensemble(out), rtol=1e-12)
    np.testing.assert_allclose(res["spread"], np.std([0, 10, 40]), atol=1e-4)   # age_spread: the members' std
    written = list(csv.DictReader(open(tmp_path / "ages.csv")))
    assert [w["Subject"] for w in written] == [r["Subject"] for r in rows] == res["subjects"]
    np.testing.assert_allclose([float(w["age_spread"]) for w in written], np.std([0, 10, 40]), atol=2e-3)
    assert {w["n_models"] for w in written} == {"3"}
    age = np.array([float(r["Age"]) for r in rows])
    mean_fit = {k: np.mean([f[k] for f in fits]) for k in ("intercept", "slope")}
    corrected = metrics.corrected_gap(age, res["combined"], mean_fit)
    for k, w in enumerate(written):
        if k % 3 == 0:
            assert w["gap"] == w["corrected_gap"] == ""
        else:
            assert float(w["gap"]) == pytest.approx(float(w["predicted_age"]) - age[k], abs=2e-3)
            assert float(w["corrected_gap"]) == pytest.approx(corrected[k], abs=1e-3)     # 3 decimals


def test_predict_reproduces_a_brain_age_runs_test_predictions_and_reports_the_corrected_gap(brain_age_cohort40,
                                                                                           brain_age_run, tmp_path):
    _, run_dir = brain_age_run
    res = _predict(run_dir, "--data-csv", brain_age_cohort40, "--out", tmp_path / "ages.csv")
    saved = load_run(run_dir).read_predictions()
    rows = [res["subjects"].index(s) for s in saved["subjects"]]
    np.testing.assert_allclose(res["combined"][rows], saved["pred"], atol=1e-4)
    lines = (tmp_path / "ages.csv").read_text().splitlines()
    assert lines[0] == "Subject,predicted_age,n_models,age_spread,gap,corrected_gap" and len(lines) == 41
    bias = load_run(run_dir).read_metrics()["age_bias"]
    table = data.read_brain_age_table(brain_age_cohort40)
    first = lines[1].split(",")
    age = float(table.age[table.subjects.index(first[0])])
    expected = float(first[1]) - age - (bias["intercept"] + bias["slope"] * age)
    assert float(first[5]) == pytest.approx(expected, abs=2e-3)


def test_a_brain_age_table_of_men_alone_trains_and_predicts_with_womens_figures_undefined_not_nan(
        brain_age_cohort40, brain_age_run, tmp_path, capsys):
    header, *cells = [line.split(",") for line in open(brain_age_cohort40).read().splitlines()]
    men = tmp_path / "men.csv"
    men.write_text("\n".join(",".join(c) for c in [header] + [c[:3] + [os.path.join(
        os.path.dirname(brain_age_cohort40), c[3])] for c in cells if c[2] == "M"]) + "\n")
    train_brain_age.main(_ba_args(men, tmp_path / "runs", "--model", "imaging", "--epochs", "1", "--batch-size", "4"))
    _predict(brain_age_run[1], "--data-csv", men, "--out", tmp_path / "men_ages.csv")
    trained, predicted = capsys.readouterr().out.split("\n", 1)
    assert re.fullmatch(r"test MAE \d+\.\d\d \(male \d+\.\d\d, female undefined\) years, .*", trained), trained
    assert re.search(r"male \d+\.\d\d, female undefined\) years", predicted) and "nan" not in predicted, predicted
    assert re.search(r"\(male [+-]\d+\.\d\d, female undefined\), bias-corrected", predicted), predicted


def test_predict_refuses_other_grids_mixed_runs_and_unfinished_runs_in_one_line(ad_cohort60, ad_fold_runs,
                                                                                tmp_path):
    run_dir, out = _run_dir(ad_fold_runs, "hyperfusion", 0), tmp_path / "out.csv"
    for name, shape, spacing in [("big", (50, 60, 48), 2.67), ("coarse", synthetic.AD_SYNTH["shape"], 3.0)]:
        folder = tmp_path / name
        os.makedirs(folder / "images")
        data.save_nifti(np.zeros(shape, np.float32), spacing, folder / "images" / "NEW1.nii.gz")
        (folder / "t.csv").write_text("Subject,AGE,PTGENDER,PTEDUCAT,APOE4,ABETA,PTAU,TAU,FDG,AV45\n"
                                      "NEW1,70,Male,16,0,,,,,\n")
        assert_clean_error(run_main(predict.main, run_dir, "--data-csv", folder / "t.csv", "--out", out),
                           "NEW1", "NEW1.nii.gz", "trained on")
    rng = np.random.default_rng(0)
    age = rng.uniform(40, 80, 5)
    other_task = fake_brain_age_run(tmp_path / "fake", 0, 3.0, age, age, np.arange(5) % 2)
    binary = fake_ad_run(tmp_path / "fake", "imaging", 0, 0, 0, random_probs(rng, 5, 2), np.arange(5) % 2,
                         classes=2, class_names=["CN", "AD"])
    for other, what in [(other_task, "task ad vs brain-age"), (binary, "classes")]:   # in the order named
        assert_clean_error(run_main(predict.main, run_dir, other, "--data-csv", ad_cohort60, "--out", out),
                           "cannot combine", what)
    unfinished = tmp_path / "unfinished"
    os.makedirs(unfinished)
    training.save_checkpoint(load_run(run_dir).checkpoint, unfinished / "best.pt")
    assert_clean_error(run_main(predict.main, unfinished / "best.pt", "--data-csv", ad_cohort60, "--out", out),
                       "best.pt", "not the checkpoint of a finished run")
    assert_clean_error(run_main(predict.main, unfinished, "--data-csv", ad_cohort60, "--out", out),
                       "unfinished", "no finished run")
    assert not out.exists() and no_temp_files(tmp_path)


def test_a_column_empty_for_every_training_subject_is_read_as_missing_at_prediction_and_said(
        ad_cohort60, tmp_path, capsys, monkeypatch):
    """A run trained without AV45 (ADNI-1 has none) reads a patient's AV45 as missing, as every training row was."""
    rows = list(csv.DictReader(open(ad_cohort60)))
    blank = tmp_path / "no_av45.csv"
    data.write_csv([dict(r, AV45="") for r in rows], rows[0].keys(), blank)
    proc = run_main(train_ad.main, *_tabular_args(blank, tmp_path / "runs", "--epochs", "1"))
    assert proc.returncode == 0 and "warning:" in proc.stderr and "column AV45 is empty" in proc.stderr, proc.stderr
    run_dir = _run_dir(tmp_path / "runs", "tabular")
    assert json.load(open(os.path.join(run_dir, "metrics.json")))["unlearned_columns"] == ["AV45"]
    capsys.readouterr()
    given = _predict(run_dir, "--data-csv", ad_cohort60, "--out", tmp_path / "p.csv")
    n = sum(bool(r["AV45"]) for r in rows)
    assert f"column AV45: {n} of 60 subjects" in capsys.readouterr().err and n > 0
    blanked = _predict(run_dir, "--data-csv", blank, "--out", tmp_path / "b.csv")
    np.testing.assert_array_equal(given["combined"], blanked["combined"])
    out = list(csv.DictReader(open(tmp_path / "p.csv")))
    assert [r["ignored"] for r in out] == ["AV45" if r["AV45"] else "" for r in rows]
    assert "ignored" not in open(tmp_path / "b.csv").readline()
    with pytest.raises(UserError, match="--attribute AV45: empty for every subject"):
        predict.sweep(run_dir, "AV45", ["1.5"])
    train_ad.main(_tabular_args(blank, tmp_path / "runs", "--epochs", "1", "--version", "1"))
    _predict(tmp_path / "runs", "--data-csv", ad_cohort60, "--out", tmp_path / "two.csv")      # both versions
    assert f"column AV45: {n} of 60 subjects have a value that 2 of 2 models cannot read" in capsys.readouterr().err
    monkeypatch.setattr(train_ad, "is_main", lambda: False)                 # torchrun's other ranks say nothing
    proc = run_main(train_ad.main, *_tabular_args(blank, tmp_path / "runs2", "--epochs", "1"))
    assert "column AV45 is empty" not in proc.stderr, proc.stderr


# ----------------------------------------------------------------------------------------------
# The program: calibration
# ECE, Brier and NLL as defined; the temperature fitted on each run's validation logits; calibrated ensembles.


def _ece_by_hand(hit, confidence, n_bins=15):
    """Guo et al.'s ECE written out: bins (k/15, (k+1)/15] (the first closed), sum of |B|/N |acc(B) - conf(B)|."""
    total = 0.0
    for k in range(n_bins):
        lo, hi = k / n_bins, (k + 1) / n_bins
        members = [i for i, c in enumerate(confidence) if (lo < c <= hi) or (k == 0 and c == 0)]
        if members:
            acc = sum(hit[i] for i in members) / len(members)
            conf = sum(confidence[i] for i in members) / len(members)
            total += len(members) / len(confidence) * abs(acc - conf)
    return total


def test_ece_is_near_zero_for_calibrated_probabilities_and_clearly_above_for_over_confident_ones_as_by_hand():
    """Labels drawn from the probabilities: calibrated; sharpened (p^3): over-confident. Each number by hand."""
    rng = np.random.default_rng(0)
    probs = rng.dirichlet([1.0, 1.0, 1.0], 3000)
    labels = np.array([rng.choice(3, p=p) for p in probs])
    sharp = probs ** 3 / (probs ** 3).sum(1, keepdims=True)
    found = {}
    for name, p in (("calibrated", probs), ("over-confident", sharp)):
        m = metrics.calibration_metrics(labels, p)
        hit, conf = list(p.argmax(1) == labels), list(p.max(1))
        assert m["ece"] == pytest.approx(_ece_by_hand(hit, conf), abs=1e-12)
        classwise = np.mean([_ece_by_hand(list(labels == c), list(p[:, c])) for c in range(3)])
        assert m["ece_classwise"] == pytest.approx(classwise, abs=1e-12)
        assert m["brier"] == pytest.approx(np.mean([sum((p[i, c] - (labels[i] == c)) ** 2 for c in range(3))
                                                    for i in range(len(labels))]), abs=1e-12)
        assert m["nll"] == pytest.approx(-np.mean([math.log(p[i, labels[i]]) for i in range(len(labels))]), abs=1e-9)
        found[name] = m
    assert found["calibrated"]["ece"] < 0.03 and found["over-confident"]["ece"] > 0.1
    assert found["calibrated"]["ece_classwise"] < 0.03 and found["over-confident"]["ece_classwise"] > 0.05
    assert found["calibrated"]["nll"] < found["over-confident"]["nll"]


def test_the_fitted_temperature_recovers_the_one_the_labels_were_drawn_at_from_0_01_to_100_not_clipped(tmp_path):
    """T = 2.5, 0.5 and, for logits 50 times too large (a run that memorised its training rows) or too small, 50 and
    0.02; logits that say nothing fit the upper bound: used (they only flatten), and the record says it is a bound.
    Both hippocampi: each side scaled, then the sides averaged."""
    rng = np.random.default_rng(2)
    base = rng.normal(0, 3, (6000, 3))
    p = np.exp(base) / np.exp(base).sum(1, keepdims=True)
    labels = np.array([rng.choice(3, p=q) for q in p])
    for true_t in (2.5, 0.5, 50.0, 0.02):
        assert training.fit_temperature(base * true_t, labels) == pytest.approx(true_t, rel=0.06)
    noise = (rng.normal(0, 50, (600, 3)), labels[:600])
    rec = training.calibrate(str(tmp_path), {"val": noise, "test": noise})
    assert rec["at_bound"] and rec["temperature"] == pytest.approx(100, rel=1e-3) and "warning" not in rec
    sides = rng.normal(0, 2, (5, 2, 3))
    by_hand = np.exp(sides / 1.7) / np.exp(sides / 1.7).sum(-1, keepdims=True)
    np.testing.assert_allclose(evaluate.probabilities(sides, 1.7), by_hand.mean(1), rtol=1e-12)
    single = sides[:, 0]                                      # one side: T never changes the argmax
    assert np.array_equal(evaluate.probabilities(single, 0.3).argmax(1), single.argmax(1))


def test_a_finished_ad_run_holds_its_temperature_fitted_on_its_own_validation_logits_and_an_older_run_gets_one(
        ad_fold_runs, tmp_path):
    """logits.npz (sides apart), calibration.json before and after; the test probabilities are the logits' softmax.
    A run trained before calibration (neither file) is calibrated from its logits predicted again, not retrained."""
    run_dir = _run_dir(ad_fold_runs, "hyperfusion", 0)
    saved = evaluate.read_logits(run_dir)
    assert saved["val"][0].shape[1:] == (2, 3) and saved["test"][0].shape[1:] == (2, 3)   # (N, sides, C)
    record = json.load(open(os.path.join(run_dir, "calibration.json")))
    assert record["temperature"] == pytest.approx(training.fit_temperature(*saved["val"]), rel=1e-9)
    assert load_run(run_dir).temperature == record["temperature"]
    for part in ("val", "test"):
        logits, labels = saved[part]
        before = metrics.calibration_metrics(labels, evaluate.probabilities(logits))
        assert record[part]["before"] == pytest.approx(before)
        assert record[part]["after"] == pytest.approx(
            metrics.calibration_metrics(labels, evaluate.probabilities(logits, record["temperature"])))
    pred = np.load(os.path.join(run_dir, "predictions.npz"))
    np.testing.assert_array_equal(pred["labels"], saved["test"][1])
    np.testing.assert_allclose(pred["probs"], evaluate.probabilities(saved["test"][0]), rtol=1e-5, atol=1e-7)
    assert record["val"]["after"]["nll"] <= record["val"]["before"]["nll"] + 1e-12      # what the fit minimises
    old = tmp_path / "old"
    shutil.copytree(run_dir, old)
    for f in ("logits.npz", "calibration.json"):
        os.remove(old / f)
    best = (old / "best.pt").read_bytes()
    res = evaluate.main(["calibrate", str(old), "--quiet", "--device", "cpu"])
    again = evaluate.read_logits(str(old))
    for part in ("val", "test"):
        np.testing.assert_allclose(again[part][0], saved[part][0], rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(again[part][1], saved[part][1])
    assert res["runs"][0]["temperature"] == pytest.approx(record["temperature"], rel=1e-4)
    assert (old / "best.pt").read_bytes() == best                                      # not retrained
    assert os.path.isfile(old / "calibration_ad.md")


def test_calibrated_prediction_keeps_every_members_class_and_changes_the_ensemble_only_through_eq8_weights(
        ad_cohort60, fold_predictions, tmp_path):
    """Each member softmax(logits / T) at its own T on its logits.npz's test subjects; the ensemble Eq. 7-8."""
    plain, runs, _ = fold_predictions
    cal = _predict(os.path.dirname(runs[0]), "--data-csv", ad_cohort60, "--out", tmp_path / "c.csv", "--calibrated")
    assert np.array_equal(cal["outputs"].argmax(-1), plain["outputs"].argmax(-1))
    np.testing.assert_allclose(cal["combined"], _eq7_8_by_hand(cal["outputs"]), atol=1e-6)
    assert not np.allclose(cal["combined"], plain["combined"], atol=1e-4)
    table = data.read_ad_table(ad_cohort60)
    test_idx = data.ad_fold(data.ad_split(table.sex, table.labels, table.age, 0), 0)[2]
    for k, r in enumerate(runs):
        expected = evaluate.probabilities(evaluate.read_logits(r)["test"][0], load_run(r).temperature)
        np.testing.assert_allclose(cal["outputs"][k][test_idx], expected, rtol=1e-5, atol=1e-6)
    own = tmp_path / "own"                                       # members at other temperatures: each at its own
    for k, (r, t) in enumerate(zip(runs, (0.5, 3.0))):
        shutil.copytree(r, own / f"fold{k}")
        data.write_json({"temperature": t}, str(own / f"fold{k}" / "calibration.json"))
    at_own = _predict(own, "--data-csv", ad_cohort60, "--out", tmp_path / "o.csv", "--calibrated")["outputs"]
    for k, t in enumerate((0.5, 3.0)):
        expected = evaluate.probabilities(evaluate.read_logits(str(own / f"fold{k}"))["test"][0], t)
        np.testing.assert_allclose(at_own[k][test_idx], expected, rtol=1e-5, atol=1e-6)


def test_calibrated_prediction_refuses_a_run_without_a_usable_temperature_or_fitted_at_its_lower_bound_not_used(
        tmp_path, capsys):
    """A perfectly separated validation set drives T to its lower bound: calibrate keeps T = 1 and says so. A
    hand-edited calibration.json, metrics.json or predictions.npz, read but of another shape: one line naming it."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 30)
    val, test = rng.normal(0, 1, (30, 3)) + 9 * np.eye(3)[labels], rng.normal(0, 1, (30, 3)) + np.eye(3)[labels]
    run_dir = fake_ad_run(tmp_path / "runs", "tabular", 0, 0, 0, evaluate.probabilities(test), labels)
    calibrated = lambda: run_main(predict.main, run_dir, "--data-csv", tmp_path / "new.csv", "--out",
                                  tmp_path / "p.csv", "--calibrated")
    assert_clean_error(calibrated(), run_dir, "no temperature", "evaluate.py calibrate")
    evaluate.save_logits(run_dir, (val, labels), (test, labels))
    (rec,) = evaluate.main(["calibrate", str(tmp_path / "runs"), "--quiet"])["runs"]
    assert rec["at_bound"] and rec["fitted"] == training.T_BOUNDS[0] and rec["temperature"] == 1.0
    assert rec["test"]["after"] == rec["test"]["before"] and "lower bound" in capsys.readouterr().err
    assert_clean_error(calibrated(), run_dir, "lower bound", "without --calibrated")
    for text, says in [("[]", "calibration.json: not the calibration.json a training run writes")] + [
            (json.dumps({"temperature": t}), f"calibration.json: temperature {t!r} is not a positive number")
            for t in (0, -1.0, True, "2")]:                           # never divided by
        data.write_text(text, os.path.join(run_dir, "calibration.json"))
        assert_clean_error(calibrated(), says)
    assert not os.path.exists(tmp_path / "p.csv")
    for text in ("{}", "[]", '{"val": {}, "test": 3}'):
        data.write_text(text, os.path.join(run_dir, "metrics.json"))
        with pytest.raises(UserError, match="metrics.json: not the metrics.json a training run writes"):
            load_run(run_dir).read_metrics()
    for probs in (np.full((30, 2), 0.5), np.where(np.eye(3)[labels] > 0, np.nan, 0.5)):   # 2 classes, NaN
        np.savez(os.path.join(run_dir, "predictions.npz"), subjects=labels.astype(str), labels=labels, probs=probs)
        with pytest.raises(UserError, match=r"predictions.npz: its arrays .* the 3 classes of the run, or hold NaN"):
            load_run(run_dir).read_predictions()
    ba = fake_brain_age_run(tmp_path / "ba", 0, 1.0, [61.0, 62.0], [60.0, 60.0], [0, 1])
    data.write_text('{"val": {}, "test": {"mae": 1.0}}', os.path.join(ba, "metrics.json"))      # no MAE to rank by
    assert_clean_error(run_main(evaluate.main, "brain-age", "--runs", tmp_path / "ba"), "metrics.json: not the")


def test_table3_reports_the_calibration_of_every_ensemble_after_the_papers_columns(ad_runs):
    runs, made, labels = ad_runs
    res = evaluate.evaluate_ad(str(runs), quiet=True)
    assert res["columns"][-4:] == ["ECE", "cwECE", "Brier", "NLL"] and res["paper_columns"] == res["columns"][:-4]
    hyper = next(m for m in res["models"] if m["model"] == "hyperfusion")
    for r, (seed, version) in zip(hyper["rows"], GROUPS):
        expected = metrics.calibration_metrics(labels[seed], _eq7_8_by_hand(made[("hyperfusion", seed, version)]))
        assert [r[t] for t in ("ECE", "cwECE", "Brier", "NLL")] == pytest.approx(
            [expected[k] for k in ("ece", "ece_classwise", "brier", "nll")])
    header = open(os.path.join(runs, "results_ad.csv")).readline()
    assert header.index("ECE mean") > header.index("AUC mean")


def test_the_calibration_report_ensembles_the_members_each_at_its_own_temperature_apart_from_cn_vs_ad_ones(tmp_path):
    """Each T fitted on its run's validation logits; after: Eq. 7-8 of softmax(test logits / T_k)."""
    rng = np.random.default_rng(2)
    val_labels, test_labels = rng.integers(0, 3, 40), rng.integers(0, 3, 30)
    seen = np.where(np.arange(40) % 5 == 0, (val_labels + 1) % 3, val_labels)      # one in five wrong: T fits inside
    logits = []
    for fold in range(4):
        val = rng.normal(0, 1, (40, 3)) + 4 * np.eye(3)[seen] * (fold + 1) / 2           # ever more over-confident
        test = rng.normal(0, 1, (30, 3)) + 4 * np.eye(3)[test_labels] * (fold + 1) / 2
        run_dir = fake_ad_run(tmp_path, "hyperfusion", 0, 0, fold, evaluate.probabilities(test), test_labels)
        evaluate.save_logits(run_dir, (val, val_labels), (test, test_labels))
        logits.append(test)
    res = evaluate.main(["calibrate", str(tmp_path), "--quiet"])
    temps = [r["temperature"] for r in sorted(res["runs"], key=lambda r: r["dir"])]
    assert temps == pytest.approx([training.fit_temperature(*evaluate.read_logits(
        training.ad_run_dir(tmp_path, "hyperfusion", 0, 0, f))["val"]) for f in range(4)])
    (ens,) = res["ensembles"]
    after = _eq7_8_by_hand([evaluate.probabilities(z, t) for z, t in zip(logits, temps)])
    before = _eq7_8_by_hand([evaluate.probabilities(z) for z in logits])
    assert ens["after"]["ece"] == pytest.approx(metrics.calibration_metrics(test_labels, after)["ece"])
    assert ens["before"]["nll"] == pytest.approx(metrics.calibration_metrics(test_labels, before)["nll"])
    assert ens["after"]["nll"] != pytest.approx(ens["before"]["nll"])
    # a temperature already fitted is kept (one set by hand too: its figures are those at it), --refit fits it again
    fold0 = training.ad_run_dir(tmp_path, "hyperfusion", 0, 0, 0)
    data.write_json({"temperature": 0.5}, os.path.join(fold0, "calibration.json"))
    for extra, t in (([], 0.5), (["--refit"], temps[0])):
        again = evaluate.main(["calibrate", str(tmp_path), "--quiet"] + extra)["runs"]
        (rec,) = [r for r in again if os.path.samefile(r["dir"], fold0)]
        assert rec["temperature"] == pytest.approx(t) and rec["test"]["after"]["nll"] == pytest.approx(
            metrics.calibration_metrics(test_labels, evaluate.probabilities(logits[0], t))["nll"])
    two = rng.integers(0, 2, 30)
    for fold in range(4):                                 # CN vs AD folds of the same model, seed and version
        z = rng.normal(0, 1, (30, 2)) + 2 * np.eye(2)[two]
        run_dir = fake_ad_run(tmp_path / "c2", "hyperfusion", 0, 0, fold, evaluate.probabilities(z), two, classes=2,
                              class_names=["CN", "AD"])
        evaluate.save_logits(run_dir, (z, two), (z, two))
    res = evaluate.main(["calibrate", str(tmp_path), "--quiet"])
    assert sorted((e["classes"], len(e["members"])) for e in res["ensembles"]) == [(2, 4), (3, 4)]
    page = (tmp_path / "calibration_ad.md").read_text()                 # each run's row says which question it is
    assert all(page.count(f"| hyperfusion{c} | 0 | 0 | {f} |") == 1 for c in ("", " (CN vs AD)") for f in range(4))
    assert all((f"{os.sep}c2{os.sep}" in m) == (e["classes"] == 2) for e in res["ensembles"] for m in e["members"])
    shutil.rmtree(training.ad_run_dir(tmp_path, "hyperfusion", 0, 0, 3))   # three folds: runs, but no ensemble
    res = evaluate.main(["calibrate", str(tmp_path), "--quiet"])
    assert len(res["runs"]) == 7 and [e["classes"] for e in res["ensembles"]] == [2]
    fold3, aside = training.ad_run_dir(tmp_path / "c2", "hyperfusion", 0, 0, 3), f"{tmp_path}-fold3"
    shutil.move(fold3, aside)                             # no four folds: --plots says so
    if evaluate.matplotlib_or_none() is not None:
        res = evaluate.main(["calibrate", str(tmp_path), "--quiet", "--plots", str(tmp_path / "fig")])
        assert list(res["plots"]["skipped"]) == ["reliability_calibrated_*.png"] and not res["plots"]["written"]
    shutil.move(aside, fold3)
    shutil.copytree(tmp_path / "c2", tmp_path / "c3")     # two runs folders of one ensemble: neither left out unsaid
    group = os.path.join("ad", "hyperfusion", "seed0", "v0")
    assert_clean_error(run_main(evaluate.main, "calibrate", tmp_path / "c2", tmp_path / "c3", "--quiet"),
                       os.path.join(tmp_path, "c2", group), os.path.join(tmp_path, "c3", group))
    assert not os.path.exists(tmp_path / "c2" / "calibration_ad.md")
    c2 = [training.ad_run_dir(tmp_path / "c2", "hyperfusion", 0, 0, f) for f in range(4)]
    shutil.rmtree(c2[3])
    shutil.copytree(c2[2], c2[3])                          # fold 2 copied over fold 3: refused, not left out
    assert_clean_error(run_main(evaluate.main, "calibrate", tmp_path / "c2", "--quiet"), c2[2], c2[3], "fold 2")
    for fold, sha in ((2, "a" * 64), (3, "b" * 64)):       # two versions of the table: never one ensemble
        evaluate.save_logits(fake_ad_run(tmp_path / "c2", "hyperfusion", 0, 0, fold, evaluate.probabilities(z), two,
                                         classes=2, class_names=["CN", "AD"], table_sha256=sha), (z, two), (z, two))
    assert_clean_error(run_main(evaluate.main, "calibrate", tmp_path / "c2", "--quiet"), c2[2], c2[3], "tables")


# ----------------------------------------------------------------------------------------------
# The program: many processes, devices, precision
# One run on many processes (torchrun, DDP), many runs at a time (--jobs, --gpus); float32 by default, bf16 and fp16
# where the GPU computes them; the benchmark.


def _tiny_batch(task, batch=4, seed=0):
    """A small (image, tabular, target) batch of either task: AD 12x16x12 with 15 attributes, brain age 36^3."""
    g = torch.Generator().manual_seed(seed)
    if task == "ad":
        return torch.randn(batch, 1, 12, 16, 12, generator=g), torch.randn(batch, 15, generator=g), \
            torch.arange(batch) % 3
    return torch.randn(batch, 1, 36, 36, 36, generator=g), torch.eye(2)[torch.arange(batch) % 2], \
        torch.rand(batch, generator=g)


def _tiny_model(task, device):
    """HyperFusion of a task at _tiny_batch's shapes, dropout off (the steps compared draw no masks)."""
    torch.manual_seed(0)
    model = build_model(task, "hyperfusion", image_shape=(36, 36, 36) if task == "brain-age" else None,
                        n_tabular=15 if task == "ad" else 2)
    for m in model.modules():
        if isinstance(m, (nn.Dropout, nn.Dropout3d)):
            m.p = 0.0
    return model.to(device)


def _ddp_worker(rank, world, init_file, batch, out):
    """One of two gloo processes: an SGD step on its share inside DDP, then its share of 5 items gathered back."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    model, net = training.wrap(_tiny_model("ad", "cpu"), torch.device("cpu"))
    image, tabular, target = (t.chunk(world)[rank] for t in batch)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    F.cross_entropy(net.train()(image, tabular), target).backward()
    opt.step()
    results = {"ddp": {k: v.detach().clone() for k, v in model.named_parameters()}}
    share = list(torch.utils.data.DistributedSampler(range(5), 2, rank, shuffle=False))   # 0 2 4 | 1 3 0 (padding)
    results["gathered"] = training.gather(np.arange(5)[share] * 10, 5)
    fresh = _tiny_model("ad", "cpu")                                           # precise BN over its share
    training.recalibrate_batchnorm(fresh, [(image, tabular, target)], torch.device("cpu"))
    results["bn"] = {k: v for k, v in fresh.state_dict().items() if k.endswith(("running_mean", "running_var"))}
    if rank == 0:
        torch.save(results, out)
    torch.distributed.barrier()            # neither leaves while the other's gloo threads still talk to it
    os._exit(0)    # no C++ destructors at exit: one ran on a live gloo thread now and then ("terminate called")


@pytest.fixture(scope="module")
def two_ddp_processes(tmp_path_factory):
    """What _ddp_worker's rank 0 saw, and the batch both processes shared."""
    tmp, batch = tmp_path_factory.mktemp("ddp"), _tiny_batch("ad", 8, seed=1)
    fork = not torch.cuda.is_initialized()          # spawn's children import this file again; CUDA forbids a fork
    torch.multiprocessing.start_processes(_ddp_worker, (2, str(tmp / "init"), batch, str(tmp / "ddp.pt")), nprocs=2,
                                          start_method="fork" if fork else "spawn")
    return torch.load(tmp / "ddp.pt", weights_only=False), batch


def _loss_and_gradient(model, batch, task, device, precision):
    """One forward + backward of a train step at a precision, as training autocasts it -> (loss, flat gradient)."""
    image, tabular, target = (t.to(device) for t in batch)
    model.zero_grad(set_to_none=True)
    with training.autocast(torch.device(device), precision):
        out = model(image, tabular).float()
    loss = F.cross_entropy(out, target) if task == "ad" else F.mse_loss(out, target)
    loss.backward()
    return loss.item(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def _finished_precision_run(cmd):
    """Stands in for a training command of the precision benchmark: metrics.json and log.csv where the script writes
    them; at bf16 half the time and an MAE 0.05 + 0.001 v higher, at fp16 a balanced accuracy 0.01 v lower."""
    v, precision, out = (cmd[cmd.index(o) + 1] for o in ("--version", "--precision", "--out"))
    if cmd[1].endswith("train_ad.py"):
        folder = training.ad_run_dir(out, "hyperfusion", 0, int(v), 2)
        test = {"balanced_accuracy": 0.7 - 0.01 * int(v) * (precision == "fp16"), "auc_macro": 0.8}
    else:
        folder = training.brain_age_run_dir(out, "hyperfusion", int(v))
        test = {"mae": 4.0 + 0.3 * (int(v) % 3) + (0.05 + 0.001 * int(v)) * (precision == "bf16")}
    os.makedirs(folder)
    data.write_json({"test": test}, os.path.join(folder, "metrics.json"))
    seconds = 5.0 if precision == "bf16" else 10.0
    data.write_text("epoch,seconds\n" + "".join(f"{e},{seconds}\n" for e in range(1, 7)),
                    os.path.join(folder, "log.csv"))


def _fit_tabular(folder, loss=F.cross_entropy, epochs=1, precision="fp32", **options):
    """training.fit of _TabularNet on 8 items in batches of 4, each epoch scoring 0.5 (options: compile, quiet)."""
    items = torch.utils.data.TensorDataset(torch.zeros(8, 0), torch.randn(8, 3), torch.randint(0, 2, (8,)))
    run = RunConfig(task="ad", model="tabular", version=0, split_seed=0, fold=0, classes=2, loss="ce", data_csv="x",
                    epochs=epochs, batch_size=4, lr=0.1, weight_decay=0.0, precision=precision)
    training.fit(_TabularNet(), torch.utils.data.DataLoader(items, batch_size=4), loss, lambda m: {"score": 0.5},
                 "score", run, str(folder), {}, **{"quiet": True, **options})


def test_a_torchrun_process_leaves_at_a_barrier_before_tearing_the_group_down_and_alone_never(monkeypatch):
    """One that tore the group down while another still wrote its files was aborted by gloo now and then."""
    calls = []
    monkeypatch.setattr(training.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(training.dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(training.dist, "barrier", lambda: calls.append("barrier"))
    monkeypatch.setattr(training.dist, "destroy_process_group", lambda: calls.append("destroy"))
    with training.alone():                                       # rank 0's nested pre-training
        training.leave()
    assert calls == []
    training.leave()
    assert calls == ["barrier", "destroy"]


def test_each_trainer_leaves_the_process_group_once_its_run_has_ended(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(training, "leave", lambda: calls.append("leave"))
    monkeypatch.setattr(train_ad, "run_ad", lambda args, device, run: calls.append(run.task) or {})
    monkeypatch.setattr(train_brain_age, "run_brain_age", lambda args, device, run: calls.append(run.task) or {})
    train_ad.main(["--data-csv", str(tiny_ad(tmp_path)), "--out", str(tmp_path / "r"), "--quiet"])
    train_brain_age.main(["--data-csv", str(_tiny_brain_age(tmp_path / "ba")), "--out", str(tmp_path / "r"), "--quiet"])
    assert calls == ["ad", "leave", "brain-age", "leave"]


def test_a_two_process_torchrun_run_writes_each_file_once_and_tests_each_subject_once(ad_cohort60, tmp_path):
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "train_ad.py", *_ad_args(ad_cohort60, tmp_path, "--device", "cpu", "--epochs", "1")],
                       cwd=HERE, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    lines = p.stdout.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith("test BA") for line in lines), p.stdout   # rank 0 alone prints:
    assert "tabular" in lines[0] and "hyperfusion" in lines[1]                        # the MLP once, then the run
    run = _run_dir(tmp_path, "hyperfusion")
    assert sorted(os.listdir(run)) == sorted(training.RUN_FILES)
    assert len(open(os.path.join(run, "log.csv")).read().strip().splitlines()) == 1 + 1     # one row per epoch
    table, metrics = data.read_ad_table(ad_cohort60), json.load(open(os.path.join(run, "metrics.json")))
    test_idx = data.ad_fold(data.ad_split(table.sex, table.labels, table.age, 0), 1)[2]
    assert np.sum(metrics["test"]["confusion_matrix"]) == len(test_idx) == 12
    pred = load_run(run).read_predictions()
    assert list(pred["subjects"]) == [table.subjects[i] for i in test_idx]             # every subject once, in order
    assert np.array_equal(pred["labels"], table.labels[test_idx])
    logits, labels = training.read_logits(run)["val"]                       # best.pt's validation, read again:
    assert metrics["val"]["nll"] == pytest.approx(   # every process validated the model rank 0 saved (BN included)
        classification_metrics(labels, training.probabilities(logits), data.CLASS_NAMES)["nll"], rel=1e-5)


def test_a_torchrun_process_whose_peer_stopped_says_so_in_one_line_with_what_is_kept_and_the_resume_command(
        ad_cohort60, tmp_path, monkeypatch):
    """gloo's error on the survivors (the peer killed, out of memory, or stopped by its own error) was a traceback;
    any other RuntimeError stays one."""
    errors = ["[../third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:17818: Connection reset "
              "by peer", "a bug"]

    def peer_lost():
        monkeypatch.setenv("WORLD_SIZE", "2")            # now, so that this process trained alone until then
        raise RuntimeError(errors.pop(0))
    _stop_after_epoch(monkeypatch, 1, peer_lost)
    args, run_dir = _tabular_args(ad_cohort60, tmp_path, "--epochs", "3"), _run_dir(tmp_path, "tabular")
    assert_clean_error(run_main(train_ad.main, *args), "error: another of torchrun's processes stopped (torchrun "
                       f"names it); this one stopped in epoch 2 of 3: {run_dir}/last.pt holds epoch 1; run again "
                       f"with: torchrun <its options> {shlex.join([sys.argv[0], *args])}")   # train_ad.py: resume
    monkeypatch.delenv("WORLD_SIZE")
    with pytest.raises(RuntimeError, match="a bug"):
        run_main(train_ad.main, *_tabular_args(ad_cohort60, tmp_path / "bug", "--epochs", "3"))


def test_one_ddp_step_on_two_processes_takes_the_mean_of_their_shares_gradients(two_ddp_processes):
    """Each process's BatchNorms normalise its own share (torch's SyncBatchNorm, --sync-bn, is CUDA's)."""
    ddp, batch = two_ddp_processes
    model = _tiny_model("ad", "cpu").train()
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    (sum(F.cross_entropy(model(i, t), y) for i, t, y in zip(*(b.chunk(2) for b in batch))) / 2).backward()
    opt.step()
    for k, v in model.named_parameters():                        # the step itself, not just the starting point
        torch.testing.assert_close(ddp["ddp"][k] - before[k], v.detach() - before[k], rtol=1e-3, atol=1e-5, msg=k)


def test_fit_steps_through_the_ddp_wrapper_so_every_step_averages_the_processes_gradients(tmp_path, monkeypatch):
    """The step calls what training.wrap returns (DistributedDataParallel under torchrun), never the bare model."""
    calls = []

    class Wrapper(nn.Module):                                    # stands in for DistributedDataParallel
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, image, tabular):
            calls.append(len(tabular))
            return self.module(image, tabular)

    monkeypatch.setattr(training, "wrap", lambda model, device, sync_bn=False: (model, Wrapper(model)))
    _scripted_fit(tmp_path, [0.1, 0.2], lower_is_better=False)
    assert calls == [4, 4] * 2                                   # both training batches of both epochs


def test_under_torchrun_each_epochs_shuffle_is_drawn_from_the_version_and_the_epoch(tmp_path):
    """As one process seeds its shuffle from (version, epoch), so is the DistributedSampler set: the versions of an
    ensemble see their data in different orders, and each epoch in another."""
    orders = {}
    for version in (0, 1):
        seen = orders[version] = []

        def sampler(items, seen=seen):
            s = torch.utils.data.DistributedSampler(items, num_replicas=2, rank=0, shuffle=True)
            s.set_epoch = lambda epoch, real=s.set_epoch: (real(epoch), seen.append(list(s)))
            return s
        _scripted_fit(tmp_path / f"v{version}", [0.1, 0.2], False, version, sampler)
    assert len(orders[0]) == 2 and orders[0][0] != orders[0][1]
    assert orders[0][0] != orders[1][0] and orders[0][1] != orders[1][1]


def test_gathered_shares_hold_every_item_once_in_order_when_the_sampler_pads(two_ddp_processes):
    assert two_ddp_processes[0]["gathered"].tolist() == [0, 10, 20, 30, 40]


def test_precise_bn_under_torchrun_gives_the_statistics_of_one_process_reading_every_share(two_ddp_processes):
    ddp, batch = two_ddp_processes
    model = _tiny_model("ad", "cpu")
    training.recalibrate_batchnorm(model, list(zip(*(b.chunk(2) for b in batch))), torch.device("cpu"))
    assert len(ddp["bn"]) > 10
    for k, v in ddp["bn"].items():
        torch.testing.assert_close(v, model.state_dict()[k], msg=k)


def test_a_training_loader_ends_in_no_partial_batch_alone_oversampled_or_in_a_torchrun_processs_share(monkeypatch):
    """A last batch of one sample would stop the tabular embedding's BatchNorm in training mode."""
    sizes = lambda n, **how: [len(y) for (y,) in training.make_loader(torch.utils.data.TensorDataset(torch.arange(n)),
                                                                       16, 0, torch.device("cpu"), **how)]
    oversampled = torch.utils.data.WeightedRandomSampler(torch.ones(33, dtype=torch.double), 33)   # App. C.4
    assert sizes(33, sampler=oversampled) == [16, 16]
    monkeypatch.setattr(training, "world_size", lambda: 4)
    monkeypatch.setattr(training, "rank", lambda: 0)
    assert sizes(36, shuffle=True) == [4, 4]                                  # 9 of the 36, in batches of 16 / 4
    oversampled = torch.utils.data.WeightedRandomSampler(torch.ones(36, dtype=torch.double), 36)
    assert sizes(36, sampler=oversampled) == [4, 4]              # a process's share of the oversampled epoch too


@pytest.mark.parametrize("main, batch", [(train_ad.main, 3), (train_ad.main, 2), (train_brain_age.main, 3)])
def test_under_torchrun_a_batch_size_its_processes_cannot_share_is_refused_before_any_work(main, batch, tmp_path,
                                                                                            monkeypatch):
    """Refused once the cache had been decoded; AD's batch of 2 on 2 processes was BatchNorm1d's traceback."""
    monkeypatch.setattr(training, "world_size", lambda: 2)
    csv_path = tiny_ad(tmp_path) if main is train_ad.main else _tiny_brain_age(tmp_path)
    p = run_main(main, "--data-csv", csv_path, "--batch-size", batch, "--device", "cpu", "--out", tmp_path / "runs")
    assert_clean_error(p, f"--batch-size {batch}: each of the 2 processes")
    assert not os.path.exists(tmp_path / "runs") and not os.path.exists(tmp_path / "cache")


def test_the_protocol_hands_its_cache_dir_and_compile_to_every_run_it_trains(tmp_path, capsys):
    for compile in ([], ["--compile"]):
        evaluate.main(["protocol", "--task", "ad", "--runs", str(tmp_path), "--models", "imaging", "--epochs", "1",
                       "--cache-dir", str(tmp_path / "cache"), "--print-commands", *compile])
        argvs = [shlex.split(line) for line in capsys.readouterr().out.strip().splitlines()]
        assert len(argvs) == 4 and all(a[a.index("--cache-dir") + 1] == str(tmp_path / "cache") for a in argvs)
        assert [train_ad.ad_arguments().parse_args(a[2:]).compile for a in argvs] == [bool(compile)] * 4


def test_gpus_are_indices_among_the_gpus_this_process_sees_and_one_that_does_not_exist_is_refused():
    """CUDA_VISIBLE_DEVICES=4,5,6,7 ... --gpus 0,1 lands on physical GPUs 4 and 5, not 0 and 1."""
    assert evaluate.gpu_masks([0, 1], 4, {"CUDA_VISIBLE_DEVICES": "4,5,6,7"}) == ["4", "5"]
    assert evaluate.gpu_masks([1, 0], 2, {}) == ["1", "0"]
    with pytest.raises(UserError, match=r"--gpus 0,2: GPU 2 does not exist here: 2 visible \(CUDA_VISIBLE_DEVICES"):
        evaluate.gpu_masks([0, 2], 2, {"CUDA_VISIBLE_DEVICES": "4,5"})
    with pytest.raises(UserError, match="no GPU is visible"):
        evaluate.gpu_masks([0], 0, {})
    for gpus in (",", "0,", "a"):       # never read as "no --gpus" (the runs would go to every visible GPU)
        assert_clean_error(run_main(evaluate.main, "protocol", "--task", "ad", "--gpus", gpus, "--print-commands"),
                           f"--gpus: '{gpus}': GPU indices separated by commas")


def test_a_launched_run_is_told_its_gpu_the_cuda_device_and_how_many_runs_share_the_machine(monkeypatch):
    """--device cuda (no silent CPU run), LOCAL_WORLD_SIZE=K, cores / K threads of this process's CPU set."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(6)))
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    child = "import os, sys, json; print(json.dumps([os.environ.get(k) for k in " \
            "('CUDA_VISIBLE_DEVICES', 'LOCAL_WORLD_SIZE', 'OMP_NUM_THREADS')] + sys.argv[1:]))"
    seen = []
    for gpus in (["4", "5"], None):
        proc, out = evaluate.start(evaluate.Job("x", [sys.executable, "-c", child, "--model", "imaging"]), 1, 2, gpus)
        proc.wait()
        out.seek(0)
        seen.append(json.loads(out.read().decode()))
        out.close()
    assert seen[0] == ["5", "2", "3", "--model", "imaging", "--device", "cuda"]
    assert seen[1][1:] == ["2", "3", "--model", "imaging"]


@pytest.mark.parametrize("options", [dict(jobs=3), dict(gpus=[0, 1, 2])], ids=["jobs-3", "gpus-0,1,2"])
def test_jobs_without_gpus_spread_the_runs_over_every_visible_gpu_and_gpus_without_jobs_a_run_on_each(
        options, tmp_path, monkeypatch):
    """--jobs 3 on three GPUs and no --gpus put every run on GPU 0; now one each, as with --gpus 0,1,2, which
    without --jobs ran one at a time, all on its first GPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,6,7")
    monkeypatch.setattr(evaluate, "evaluate_ad", lambda *a, **k: None)
    child = "import os, sys; open(sys.argv[1], 'w').write(' '.join([os.environ['CUDA_VISIBLE_DEVICES']] + " \
            "sys.argv[2:]))"
    commands, real_start = [], evaluate.start

    def spy(job, slot, k, gpus):                 # the training script's command kept, a child that says its GPU run
        commands.append(job.command)
        return real_start(dataclasses.replace(job, command=[sys.executable, "-c", child,
                                                            str(tmp_path / f"{len(commands)}.txt")]), slot, k, gpus)

    monkeypatch.setattr(evaluate, "start", spy)
    trained, _, _ = evaluate.run_protocol("ad", str(tmp_path / "runs"), models=["imaging"], epochs=1, quiet=True,
                                          **options)
    assert len(trained) == len(commands) == 4 and all("train_ad.py" in c[1] for c in commands)
    told = [(tmp_path / f"{k}.txt").read_text().split() for k in range(1, 5)]
    assert [t[1:] for t in told] == [["--device", "cuda"]] * 4
    assert [t[0] for t in told[:3]] == ["5", "6", "7"] and told[3][0] in ("5", "6", "7")


def test_an_interrupted_run_protocol_with_jobs_ends_the_trainings_it_started(tmp_path, monkeypatch):
    """Ctrl-C, SIGTERM or an error of the runner left its --jobs trainings running; now it stops them first."""
    pid_file = tmp_path / "pid"
    child = "import os, signal, sys, time; signal.signal(signal.SIGTERM, lambda *a: (open(sys.argv[1] + '.term', " \
            "'w').close(), sys.exit(143))); open(sys.argv[1], 'w').write(str(os.getpid())); time.sleep(120)"
    real_sleep, interrupted = evaluate.time.sleep, []

    def interrupt_once_it_runs(seconds):                      # time.sleep, of the runner's poll and of Popen.wait
        if not interrupted and pid_file.exists() and pid_file.read_text():
            interrupted.append(True)
            raise KeyboardInterrupt
        real_sleep(min(seconds, 0.05))

    monkeypatch.setattr(evaluate.time, "sleep", interrupt_once_it_runs)
    with pytest.raises(KeyboardInterrupt):
        evaluate.run_jobs([evaluate.Job(str(tmp_path / "run"), [sys.executable, "-c", child, str(pid_file)])], 1)
    pid = int(pid_file.read_text())
    try:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)                                   # ended, and waited for (no zombie left either)
        assert (tmp_path / "pid.term").exists()               # by SIGTERM: a training saves what it holds
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def test_loader_workers_count_the_cores_this_process_may_use_not_the_machines(monkeypatch):
    """A container or a scheduler's share of a 64-core machine: 4 cores usable, os.cpu_count() still says 64."""
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert training.loader_workers(None, torch.device("cuda")) == 2                  # 4 cores / 2 processes
    assert training.loader_workers(None, torch.device("cpu")) == 0 and training.loader_workers(3, None) == 3
    assert training.cores() == 4
    monkeypatch.delattr(os, "sched_getaffinity")                                     # macOS: no affinity
    assert training.cores() == 64


@pytest.mark.parametrize("device, capability, asked, resolved, replayed", [
    ("cpu", None, "auto", "fp32", "fp32"), ("cuda", (8, 0), "auto", "fp32", "fp32"),
    ("cpu", None, "bf16", "bfloat16 on a CPU is slower", "fp32"), ("cpu", None, "fp16", "float16 with loss", "fp32"),
    ("cuda", (8, 0), "bf16", "bf16", "bf16"), ("cuda", (7, 5), "bf16", "Tesla T4 only emulates bfloat16", "fp32"),
    ("cuda", (7, 5), "fp16", "fp16", "fp16")],
    ids=["cpu-auto", "gpu-auto", "cpu-bf16", "cpu-fp16", "ampere-bf16", "turing-bf16", "turing-fp16"])
def test_the_precision_is_float32_by_default_refused_where_the_device_cannot_train_it_and_replayed_where_it_can(
        device, capability, asked, resolved, replayed, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    dev = torch.device(device)
    if resolved in training.PRECISIONS:
        assert training.resolve_precision(asked, dev) == resolved
        assert f"device {device}, precision {resolved}" + " (--precision auto)" * (asked == "auto") in \
            capsys.readouterr().out                                    # a CPU build on a GPU machine is seen
    else:
        with pytest.raises(UserError, match=f"--precision {asked}: {resolved}"):
            training.resolve_precision(asked, dev)
    assert training.replay_precision(asked, dev) == replayed
    assert [training.replay_precision(p, dev) for p in ("fp32", None, "bf16+fp32:hyper")] == ["fp32"] * 3


def test_a_training_script_run_at_the_default_precision_trains_in_float32_on_this_cpu(tabular_run):
    assert load_run(_run_dir(tabular_run, "tabular")).run.precision == "fp32"


@pytest.fixture
def tf32_on():
    """TF32 on and cuDNN's benchmark off, as a device may hold them before its set-up; the flags as they were after."""
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    saved = matmul.allow_tf32, cudnn.allow_tf32, cudnn.benchmark
    matmul.allow_tf32, cudnn.allow_tf32, cudnn.benchmark = True, True, False
    yield
    matmul.allow_tf32, cudnn.allow_tf32, cudnn.benchmark = saved


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_on_a_gpu_float32_means_float32_tf32_is_switched_off_where_the_device_is_set_up(device, tf32_on, monkeypatch):
    """cuDNN's convolutions default to TF32 (a 10-bit mantissa) on Ampere on."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert training.setup_device(device).type == device
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    assert torch.backends.cudnn.benchmark == (device == "cuda")          # its fastest algorithm for each shape


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_under_torchrun_each_process_takes_its_local_ranks_gpu_in_an_nccl_group_or_joins_gloo_on_a_cpu(device, tf32_on,
                                                                                                      monkeypatch):
    groups, chosen = [], []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(training.dist, "init_process_group",
                        lambda backend, timeout, device_id: groups.append((backend, device_id)))
    monkeypatch.setattr(training.atexit, "register", lambda fn: None)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert training.setup_device(device) == (torch.device("cuda", 1) if device == "cuda" else torch.device("cpu"))
    assert groups == [("nccl", torch.device("cuda", 1)) if device == "cuda" else ("gloo", None)]
    assert chosen == ([torch.device("cuda", 1)] if device == "cuda" else [])
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(UserError, match="process 2 has no GPU of its own") if device == "cuda" else \
            contextlib.nullcontext():
        training.setup_device(device)


def test_adam_is_fused_on_cuda_and_plain_on_a_cpu(monkeypatch):
    made = []
    monkeypatch.setattr(torch.optim, "Adam", lambda params, **kwargs: made.append(kwargs))
    for device in ("cuda", "cpu"):
        training.make_optimizer(nn.Linear(2, 1), 1e-3, 1e-5, torch.device(device))
    assert made == [dict(lr=1e-3, weight_decay=1e-5, fused=True), dict(lr=1e-3, weight_decay=1e-5, fused=False)]


def test_fit_runs_forward_and_loss_in_one_autocast_at_the_runs_precision_and_scales_float16s_loss(tmp_path,
                                                                                                   monkeypatch):
    """What a GPU run at bf16 or fp16 does (CPU autocast here); float16's GradScaler enabled with it alone."""
    seen, scalers, real_scaler = [], [], torch.amp.GradScaler

    def loss_fn(out, target):
        seen.append((out.dtype, torch.is_autocast_enabled("cpu")))
        return F.cross_entropy(out.float(), target)
    monkeypatch.setattr(torch.amp, "GradScaler", lambda device, enabled: scalers.append(enabled) or
                        real_scaler(device, enabled=False))                     # no CUDA here to scale on
    for precision in ("fp32", "bf16", "fp16"):
        _fit_tabular(tmp_path / precision, loss_fn, precision=precision)
    assert seen == [(torch.float32, False)] * 2 + [(torch.bfloat16, True)] * 2 + [(torch.float16, True)] * 2
    assert scalers == [False, False, True]


class _SmallNet(nn.Module):
    """What the networks are made of (Conv3d, BatchNorm, ReLU, max-pool, dropout, a hyperlayer), compiled in seconds."""

    def __init__(self):
        super().__init__()
        self.conv, self.norm, self.dropout = nn.Conv3d(1, 4, 3, padding=1), nn.BatchNorm3d(4), nn.Dropout(0.5)
        self.head = HyperLinear(4 * 6 * 8 * 6, 3, nn.Linear(15, 2), 2)

    def forward(self, image, tabular):
        x = F.max_pool3d(F.relu(self.norm(self.conv(image))), 2)         # (B, 4, 6, 8, 6)
        return self.head(self.dropout(x.flatten(1)), tabular)


def test_compile_trains_with_eager_float32s_arithmetic_and_dropout_masks(tmp_path, monkeypatch):
    """The same step (dropout's masks, the running statistics it moves) within float32's own error of eager."""
    torch.manual_seed(0)
    model, batch = _SmallNet(), _tiny_batch("ad")
    state, results, moved = copy.deepcopy(model.state_dict()), {}, {}
    for name, net in (("eager", model), ("compiled", training.compiled(model)), ("float64", model)):
        model.load_state_dict(state)                        # the running statistics move in train mode
        torch.manual_seed(1)                                # the same dropout masks
        dtype = torch.float64 if name == "float64" else torch.float32
        results[name] = _loss_and_gradient(net.to(dtype).train(), tuple(t.to(dtype) if t.is_floating_point() else t
                                                                         for t in batch), "ad", "cpu", "fp32")
        moved[name] = torch.cat([model.norm.running_mean, model.norm.running_var]).double()
    (loss, grad), (loss_c, grad_c), (_, grad64) = results["eager"], results["compiled"], results["float64"]
    assert loss_c == pytest.approx(loss, rel=1e-6) and grad.norm() > 0
    assert (grad_c - grad).norm() <= 2 * (grad.double() - grad64).norm(), "compiled and eager differ beyond float32"
    assert torch.equal(moved["eager"].float(), moved["compiled"].float()) or \
        (moved["compiled"] - moved["eager"]).norm() <= 2 * (moved["eager"] - moved["float64"]).norm()
    compiles = []
    monkeypatch.setattr(training, "compiled", lambda net: compiles.append(net) or net)
    for compile in (False, True):                           # fit trains through it with --compile alone
        _fit_tabular(tmp_path / str(compile), compile=compile)
    assert len(compiles) == 1 and isinstance(compiles[0], _TabularNet)


def test_the_time_left_of_a_compiled_run_is_the_pace_of_its_epochs_after_the_one_that_compiled(tmp_path, monkeypatch,
                                                                                                capsys):
    """A compiled run's first epoch also compiles (10-30 s here, more on a GPU): 660 s, then 60 s an epoch."""
    now = [0.0]

    class Compiled(nn.Module):                                   # 600 s to compile, 30 s a batch (two an epoch)
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, image, tabular):
            now[0] += 30 + 600 * (now[0] == 0)
            return self.net(image, tabular)

    monkeypatch.setattr(training, "compiled", Compiled)
    monkeypatch.setattr(training, "Progress", lambda *a, **k: data.Progress(*a, **k, clock=lambda: now[0]))
    _fit_tabular(tmp_path, epochs=4, compile=True, quiet=False)
    left = re.findall(r"\| ([\d.]+) min left", capsys.readouterr().out)
    assert left == ["33.0", "2.0", "1.0", "0.0"]                # 660 s x 3; then 60 s x 2, 60 s x 1


@pytest.mark.parametrize("main, args, why", [
    (train_ad.main, ["--precision", "fp16"], "error: --precision fp16: "),
    (train_ad.main, ["--precision", "bf16"], "error: --precision bf16: "),
    (train_ad.main, ["--sync-bn"], "error: --sync-bn: "),
    (bench.main, ["gpu-check", "--precision", "fp16"], "bench.py: error: --precision fp16: CUDA only"),
    (bench.main, ["precision"], "bench.py: error: --precision bf16: training refuses"),     # its default
    (bench.main, ["--precision", "fp16"], "bench.py: error: --precision fp16: CUDA only"),
    (bench.main, ["gpu-check", "--device", "cuda"], "bench.py: error: --device cuda: no CUDA device")],
    ids=["train-fp16", "train-bf16", "train-sync-bn", "bench-gpu-check-fp16", "bench-precision-bf16", "bench-fp16",
         "bench-gpu-check-no-gpu"])
def test_float16_bfloat16_or_sync_bn_on_a_cpu_is_refused_by_training_and_the_benchmark_in_one_line_naming_it(
        main, args, why, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["bench.py"])                # argparse names the script from argv[0]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    data_dir = ["--model", "tabular", "--data-dir", tmp_path / "data"] if main is train_ad.main else []
    p = run_main(main, "--device", "cpu", *args, *data_dir, "--out", tmp_path / "runs")
    lines = p.stderr.splitlines()
    assert p.returncode == 2 and p.stdout == "" and lines[-1].startswith(why), p.stderr
    assert len(lines) == 1 or main is bench.main, p.stderr                  # the benchmark's usage, argparse's, first
    assert not os.path.exists(tmp_path / "runs") and not os.path.exists(tmp_path / "data")    # before any work


def test_the_benchmark_refuses_a_budget_versions_or_out_it_cannot_use_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["bench.py"])                # argparse names the script from argv[0]
    (tmp_path / "file").write_text("")
    for args, why in [(["--budget", "60"], "--budget: not an option of ratios"),    # not ignored: no cap there
                      (["precision", "--skip", "tests", "--precision", "fp32"], "--skip: not an option of precision"),
                      (["gpu-check", "--budget", "-5"], "--budget -5: must be above 0"),   # not an empty report
                      (["gpu-check", "--budget", "nan"], "--budget nan"),
                      (["precision", "--precision", "fp32", "--versions", "3-1"], "argument --versions: '3-1'"),
                      (["--out", tmp_path / "file"], f"--out {tmp_path / 'file'}: a file")]:   # not a traceback
        p = run_main(bench.main, "--device", "cpu", "--quick", "--out", tmp_path / "b", *args)
        assert p.returncode == 2 and p.stderr.splitlines()[-1].startswith(f"bench.py: error: {why}"), p.stderr
    assert sorted(os.listdir(tmp_path)) == ["file"]


@pytest.mark.parametrize("device", DEVICES[1:])       # a CPU refuses bf16 (training.resolve_precision)
@pytest.mark.parametrize("task", ["ad", "brain-age"])
def test_check_a_bfloat16_train_step_stays_within_tolerance_of_float32(device, task):
    """On a GPU: bfloat16's 8-bit mantissa through a network (seen: loss 0.1-1.7%, cosine 0.95-0.99, norms 15%)."""
    model, batch = _tiny_model(task, device), _tiny_batch(task)
    state = copy.deepcopy(model.state_dict())                 # batch norm's running statistics move in train mode
    loss32, grad32 = _loss_and_gradient(model.train(), batch, task, device, "fp32")
    model.load_state_dict(state)
    loss16, grad16 = _loss_and_gradient(model.train(), batch, task, device, "bf16")
    assert abs(loss16 - loss32) <= 0.03 * abs(loss32), (loss16, loss32)
    assert F.cosine_similarity(grad16, grad32, dim=0).item() >= 0.9
    assert abs(grad16.norm().item() - grad32.norm().item()) <= 0.25 * grad32.norm().item()


def test_the_paired_precision_benchmark_gives_the_t_interval_of_the_loss_and_calls_non_inferior_only_over_8_versions():
    ref = np.array([0.70, 0.72, 0.68, 0.71, 0.69, 0.73, 0.70, 0.72])
    loss = np.array([0.010, -0.005, 0.0, 0.004, 0.002, -0.001, 0.003, 0.0])
    s = bench.paired_loss(ref, ref - loss, +1)                             # BA: fp32 minus the precision's
    se = loss.std(ddof=1) / math.sqrt(8)
    assert s["mean"] == pytest.approx(loss.mean()) and s["n"] == 8
    assert s["high"] == pytest.approx(loss.mean() + 2.364624251592784 * se)      # Student t, 7 degrees of freedom
    assert s["low"] == pytest.approx(loss.mean() - 2.364624251592784 * se)
    assert s["one_sided"] == pytest.approx(loss.mean() + 1.8945786050900062 * se)
    assert bench.verdict(s, 0.02).startswith("non-inferior")
    assert bench.verdict(bench.paired_loss(ref, ref - loss - 0.02, +1), 0.02).startswith("not shown (upper bound")
    within = bench.paired_loss(ref, ref - loss - 0.017, +1)                # a mean loss within the margin: not enough
    assert within["mean"] < 0.02 < within["high"] and bench.verdict(within, 0.02).startswith("not shown (upper")
    assert bench.verdict(bench.paired_loss(ref[:7], ref[:7] - loss[:7], +1), 0.02) == \
        "not shown (7 versions, 8 needed)"
    mae = bench.paired_loss([3.0, 3.2], [3.5, 3.6], -1)                    # MAE: the precision's minus fp32
    assert mae["losses"] == pytest.approx([0.5, 0.4])


def test_the_paired_precision_benchmark_pairs_each_version_with_itself_from_the_runs_files(tmp_path, monkeypatch):
    """Test MAE from metrics.json, time from log.csv; runs via the script with --resume; finished ones not again."""
    asked = []

    def train(cmds, jobs, timeout):
        asked.extend(cmds)
        for cmd in cmds:
            _finished_precision_run(cmd)
    monkeypatch.setattr(bench, "run_commands", train)
    monkeypatch.setattr(bench.synthetic, "builtin_cohort", lambda *a, **k: None)
    s = bench.settings("cpu", False, name="precision")
    pairs, per_version = bench.precision_pairs("brain-age", list(range(8)), s, "cpu", str(tmp_path), 1e7)
    assert len(asked) == 16 and all(c[1].endswith("train_brain_age.py") and "--resume" in c for c in asked)
    assert {(c[c.index("--precision") + 1], c[c.index("--version") + 1]) for c in asked} == \
        {(p, str(v)) for p in ("fp32", "bf16") for v in range(8)}
    (mae,) = pairs
    assert (mae["precision"], mae["metric"], mae["versions"]) == ("bf16", "mae", 8)
    assert mae["mean_loss"] == pytest.approx(0.05 + 0.0035) and mae["time_ratio"] == pytest.approx(2.0)
    assert mae["verdict"].startswith("non-inferior")
    assert [r["bf16 mae"] - r["fp32 mae"] for r in per_version] == pytest.approx([0.05 + 0.001 * v for v in range(8)])
    asked.clear()
    bench.precision_pairs("brain-age", list(range(9)), s, "cpu", str(tmp_path), 1e7)
    assert sorted(c[c.index("--version") + 1] for c in asked) == ["8", "8"]          # the finished 16 reused
    for settings, device in ((dict(s, epochs=3), "cpu"), (s, "cuda")):   # a --quick dry run's or another device's
        asked.clear()                                                          # runs: not reused as these
        bench.precision_pairs("brain-age", [0], settings, device, str(tmp_path), 1e7)
        assert len(asked) == 2, (settings["epochs"], device)


def test_on_a_gpu_the_paired_precision_runs_train_one_at_a_time(tmp_path, monkeypatch):
    """Two runs sharing one GPU pull their time ratio toward 1: on CUDA one at a time whatever --jobs says."""
    for device, most in (("cuda", 1), ("cpu", 2)):
        running, seen = [], []

        class Training:
            def __init__(self, cmd, **kwargs):
                self.cmd, self.returncode = cmd, None
                running.append(self)
                seen.append(len(running))

            def communicate(self, timeout=None):
                running.remove(self) if self in running else None
                _finished_precision_run(self.cmd)
                self.returncode = 0
                return "", ""

            def poll(self):
                return self.returncode
        monkeypatch.setattr(bench.subprocess, "Popen", Training)
        monkeypatch.setattr(bench.synthetic, "builtin_cohort", lambda *a, **k: None)
        s = bench.settings(device, False, name="precision", precisions=["fp16"], jobs=2)
        bench.precision_pairs("brain-age", [0, 1], s, device, str(tmp_path / device), 1e7)
        assert len(seen) == 4 and max(seen) == most, (device, seen)


def test_the_benchmarks_peak_memory_is_reset_after_the_warm_up_steps(monkeypatch):
    """cudnn.benchmark's first steps try algorithms with workspaces training never holds (CUDA calls recorded)."""
    order = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a: order.append("reset"))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: order.append("peak") or 2 ** 21)
    seconds, peak = bench.run_steps(lambda: order.append("step"), steps=2, warmup=3, device="cuda")
    assert order == ["step"] * 3 + ["reset"] + ["step"] * 2 + ["peak"] and peak == 2.0 and seconds >= 0


def test_the_benchmarks_step_flops_are_torchs_count_of_forward_loss_and_backward_and_its_rate_flops_per_second(
        monkeypatch):
    image, tabular, target = _tiny_batch("ad", 2)                         # what bench.measure steps on
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(models.build_model("ad", "hyperfusion", n_tabular=15)(image, tabular), target).backward()
    compiles = []
    monkeypatch.setattr(bench, "compiled", lambda net: compiles.append(net) or net)   # training's --compile
    for compile in (False, True):
        assert bench.measure("ad", "hyperfusion", (12, 16, 12), 2, 1, "cpu", warmup=0, compile=compile)["flops"] == \
            counter.get_total_flops() > 0
    assert len(compiles) == 1
    monkeypatch.setattr(bench, "run_commands", lambda cmds, jobs, timeout: [json.dumps(   # HyperFusion: half the
        dict(matmul=48.0, conv3d=24.0) if '"reference": true' in cmds[0][-1] else        # speed, 3x the memory
        dict(seconds=0.5, peak_mb=1.0, flops=6e9) if '"imaging"' in cmds[0][-1] else
        dict(seconds=1.0, peak_mb=3.0, flops=6e9))])
    s = bench.settings("cpu", True, cases=[("ad", (16, 24, 16), 4)], compile=["fp32"])
    out = bench.throughput(s, "cpu", lambda: 60)
    assert out["reference_gflop_s"] == {"matmul": 48.0, "conv3d": 24.0}
    assert [(r["model"], r["gflop_sample"], r["gflop_s"], r["of_matmul"], r["of_conv3d"]) for r in out["rows"]] == \
        [("imaging", 1.5, 12.0, 0.25, 0.5)] + [(m, 1.5, 6.0, 0.125, 0.25) for m in ("hyperfusion",
                                                                              "hyperfusion compiled")]
    assert [out["ratios"][0][k] for k in ("time_ratio", "memory_ratio", "compiled_speedup")] == [2.0, 3.0, 1.0]
    assert out["hours"]["fp32"] == {"ad": pytest.approx(2_120 * 0.6 * 250 * 36 * (4 / 8 + 1 / 4) / 3600)}  # 4 + 1
    where = (("cuda", False), ("cpu", True), ("cuda", False, "ratios"))   # the GPU check: compiled too, at float32
    assert [bench.settings(*w)["compile"] for w in where] == [["fp32"], [], []]


def test_the_hyperlayer_benchmark_gives_each_modes_speed_up_as_the_naive_loops_time_over_its_own(tf32_on, monkeypatch):
    timed = iter([0.001, 0.002, 0.008] * 2)               # factorised, materialised, naive; for each of two layers
    tf32 = []                                             # each timed at training's float32, not TF32
    monkeypatch.setattr(bench, "run_steps", lambda step, steps, warmup, device: (
        tf32.append(torch.backends.cuda.matmul.allow_tf32 or torch.backends.cudnn.allow_tf32), next(timed), None)[1:])
    rows = bench.hyperlayers(True, "cpu")["rows"]
    assert [(r["factorised"], r["speedup_factorised"], r["speedup_materialised"]) for r in rows] == \
        [(pytest.approx(1.0), pytest.approx(8.0), pytest.approx(4.0))] * 2 and tf32 == [False] * 6
    assert [r["case"].split(", ")[-1] for r in rows] == ["B=16", "B=8"]   # the batches --quick measured, not 64, 32


def test_the_gpu_checks_tests_stop_at_their_time_cap_keeping_the_outcomes_printed_before_it(monkeypatch):
    def run(command, timeout, **kwargs):                  # pytest still running when the cap comes
        raise subprocess.TimeoutExpired(command, timeout, output=b"test_all.py::test_check_a[device-cpu] PASSED\n")
    monkeypatch.setattr(bench.subprocess, "run", run)
    assert bench.tests("cpu", 7.2) == dict(cases=[dict(test="test_check_a[device-cpu]", outcome="passed")],
                                           stopped="capped at 7 s", output=None)


def test_the_loader_measure_gives_every_worker_several_batches_of_each_timed_pass(monkeypatch):
    """With 4 batches for 8 workers a pass timed one batch's latency, not the loader's rate."""
    seen, passes = {}, []

    class Batches(list):                                  # a pass to start the workers and fill the page cache, then
        def __iter__(self):                               # the timed one
            passes.append(len(self))
            return super().__iter__()
    monkeypatch.setattr(bench, "loader_workers", lambda requested, dev: 8)
    monkeypatch.setattr(bench, "make_loader", lambda ds, batch, workers, dev, shuffle: seen.update(n=len(ds), w=workers)
                        or Batches([(torch.zeros(batch), None, None)]))
    (r,) = bench.loader(dict(cases=[("brain-age", (8, 8, 8), 4)]), "cpu", [])["rows"]
    assert seen == {"n": 4 * 3 * 8, "w": 8} and r["batches"] == 24 and r["samples_s"] > 0 and passes == [1, 1]


def test_the_gpu_checks_report_has_every_section_with_numbers(tmp_path, monkeypatch):
    """On CPU at the smallest settings, the precision section aside (held below); the children run in-process."""
    threads = torch.get_num_threads()

    def here(cmds, jobs, timeout):
        outs = []
        for cmd in cmds:
            assert cmd[1:3] == [os.path.join(bench.HERE, "bench.py"), "--child"], cmd
            with contextlib.redirect_stdout(io.StringIO()) as out:
                bench.main(cmd[2:])
            outs.append(out.getvalue())
        torch.set_num_threads(threads)                            # a child sets its own
        return outs

    monkeypatch.setattr(bench, "run_commands", here)
    real_steps = bench.run_steps                         # one timed step, no warm-up: numbers, not good ones
    monkeypatch.setattr(bench, "run_steps", lambda step, steps, warmup, device: real_steps(step, 1, 0, device))
    assert bench.CHECK_SECTIONS[-1] == "precision"       # the paired runs take the time the measures leave
    sections = [s for s in bench.CHECK_SECTIONS if s != "precision"]
    report = bench.run_report(sections, "cpu", True, str(tmp_path), steps=1, warmup=1)
    sections = report["sections"]
    assert list(sections) == ["tests", "hyperlayers", "throughput", "loader"]
    assert all(s["status"] == "ok" for s in sections.values()), {k: s.get("error") for k, s in sections.items()}
    assert {c["outcome"] for c in sections["tests"]["cases"]} == {"passed"} and sections["tests"]["output"] is None
    assert all(r["speedup_factorised"] > 0 for r in sections["hyperlayers"]["rows"])
    assert {(r["task"], r["model"]) for r in sections["throughput"]["rows"] if r["samples_s"] > 0} == \
        {(t, m) for t in ("ad", "brain-age") for m in ("imaging", "hyperfusion")}
    assert all(r["time_ratio"] > 0 for r in sections["throughput"]["ratios"])
    assert len(hours := sections["throughput"]["hours"]["fp32"]) == 2 and all(h > 0 for h in hours.values())
    assert all(r["samples_s"] > 0 and r["loader_over_model"] > 0 for r in sections["loader"]["rows"])
    assert json.load(open(tmp_path / "check.json"))["sections"].keys() == sections.keys()
    md = (tmp_path / "check.md").read_text()
    assert "## loader: ok" in md and "passed " in md and "the paper's protocols at fp32" in md


@pytest.mark.parametrize("ending", ["budget", "failure"])
def test_the_gpu_checks_precision_section_keeps_every_version_finished_when_its_budget_runs_out_or_a_run_fails(
        tmp_path, monkeypatch, ending):
    """One version more at a time, both tasks in turn."""
    asked = []

    def train(cmds, jobs, timeout):
        for cmd in cmds:
            task = "ad" if cmd[1].endswith("train_ad.py") else "brain-age"
            asked.append((task, cmd[cmd.index("--version") + 1], cmd[cmd.index("--precision") + 1]))
            if asked[-1][:2] == ("brain-age", "2"):
                if ending == "budget":
                    raise subprocess.TimeoutExpired(cmd, timeout)
                raise RuntimeError("train_brain_age.py: exit 2: error: a run failed")
            _finished_precision_run(cmd)
    monkeypatch.setattr(bench, "run_commands", train)
    monkeypatch.setattr(bench.synthetic, "builtin_cohort", lambda *a, **k: None)
    report = bench.run_report(["precision"], "cpu", True, str(tmp_path), precisions=["fp16"], versions=[0, 1, 2, 3])
    assert [(t, v) for t, v, p in asked if p == "fp32"] == [("ad", "0"), ("brain-age", "0"), ("ad", "1"),
                                                           ("brain-age", "1"), ("ad", "2"), ("brain-age", "2")]
    saved = json.load(open(tmp_path / "check.json"))["sections"]["precision"]
    assert saved["status"] == ("ok" if ending == "budget" else "failed")
    assert {(r["task"], r["metric"], r["versions"]) for r in saved["rows"]} == {
        ("ad", "balanced_accuracy", 3), ("ad", "auc_macro", 3), ("brain-age", "mae", 2)}
    assert [r["mean_loss"] for r in saved["rows"] if r["metric"] == "balanced_accuracy"] == pytest.approx([0.01])
    assert ("brain-age version 2 did not finish" in saved["stopped"] if ending == "budget" else
            "error: a run failed" in saved["error"])
    md = (tmp_path / "check.md").read_text()
    assert "| ad | fp16 | balanced_accuracy | 3 | 0.01 |" in md and "| brain-age | fp16 | mae | 2 |" in md
    assert report["sections"]["precision"]["rows"] == saved["rows"]


# ----------------------------------------------------------------------------------------------
# The program: command lines, progress, the code's shape
# Documented commands parse; progress a person can follow and --quiet; figures optional; imports form a tree.


SOURCES = sorted(f for f in os.listdir(HERE) if f.endswith(".py"))


def _imports(tree):
    """(top-level module, imported name or None, inside a function?) for every absolute import in the tree."""
    inside = {id(n) for fn in ast.walk(tree) if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
              for n in ast.walk(fn)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from ((a.name.split(".")[0], None, id(node) in inside) for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            yield from ((node.module.split(".")[0], a.name, id(node) in inside) for a in node.names)


def test_the_readmes_first_command_names_files_that_exist_and_options_that_parse():
    """What a reader runs first: each file it names is here, and train_ad.py's own parser reads its options."""
    block = re.search(r"```bash\n(.*?)```", open(os.path.join(HERE, "README.md")).read(), re.S).group(1)
    segments = [shlex.split(seg) for ln in block.splitlines() if not ln.startswith("#") for seg in ln.split("&&")]
    files = [w for words in segments for w in words if re.fullmatch(r"[\w-]+\.(py|txt)", w)]
    assert "train_ad.py" in files and all(os.path.isfile(os.path.join(HERE, f)) for f in files), files
    for words in segments:
        if "train_ad.py" in words:
            train_ad.ad_arguments().parse_args(words[words.index("train_ad.py") + 1:])   # SystemExit if not


def test_imports_form_a_tree_with_no_circles_and_no_private_names():
    modules, graph = {f[:-3] for f in SOURCES}, {}
    for f in SOURCES:
        tree = ast.parse(open(os.path.join(HERE, f)).read(), f)
        imports = list(_imports(tree))
        if f == "layers.py":                                     # copy-pasteable: imports nothing but torch
            assert {module for module, _, _ in imports} <= {"torch", "math", "copy"}, imports
        graph[f[:-3]] = {module for module, _, _ in imports if module in modules}
        for module, name, in_function in (i for i in imports if i[0] in modules):
            assert not in_function, f"{f} imports {module} inside a function"
            assert not (name or "").startswith("_"), f"{f} imports {module}.{name}"
        for node in ast.walk(tree):  # module._name is a private name too
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules:
                assert not (node.attr.startswith("_") and not node.attr.startswith("__")), \
                    f"{f} uses {node.value.id}.{node.attr}"
    assert "train_ad" not in graph["train_brain_age"]
    list(graphlib.TopologicalSorter(graph).static_order())       # CycleError names an import circle


def test_matplotlib_is_imported_only_where_a_figure_is_drawn_and_every_command_line_goes_through_run_cli():
    """Without matplotlib everything but --plots runs; a script's refusals (argparse's too) are one `error:` line."""
    for f in (f for f in SOURCES if f != "test_all.py"):
        tree = ast.parse(open(os.path.join(HERE, f)).read(), f)
        assert all(inside for module, _, inside in _imports(tree) if module == "matplotlib"), f
        if any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in tree.body):   # bench.py: SIGTERM ends
            last = tree.body[-1]                                                       # its runs, none orphaned
            assert isinstance(last, ast.If) and ast.unparse(last.test) == "__name__ == '__main__'", f
            assert ast.unparse(last.body[0]).startswith(("run_cli(main", "data.run_cli(main")), f


@pytest.mark.parametrize("command", ["ad", "brain-age", "sweep"])
def test_without_matplotlib_plots_stops_before_any_work_in_one_line_and_writes_nothing(tmp_path, monkeypatch,
                                                                                     command):
    rng = np.random.default_rng(6)
    if command == "ad":
        labels = rng.integers(0, 3, 12)
        for fold in range(4):
            fake_ad_run(tmp_path, "hyperfusion", 0, 0, fold, random_probs(rng, 12), labels)
    elif command == "brain-age":
        age = rng.uniform(20, 80, 12)
        fake_brain_age_run(tmp_path, 0, 2.0, age + 1, age, np.arange(12) % 2)
    args = ["sweep", tmp_path / "no-such-run", "--attribute", "Sex", "--values", "M"] if command == "sweep" \
        else [command, "--runs", tmp_path]
    before = _files(tmp_path)
    monkeypatch.setitem(sys.modules, "matplotlib", None)         # `import matplotlib` raises ImportError
    p = run_main(evaluate.main, *args, "--plots", tmp_path / "figures")
    assert p.returncode == 2 and p.stderr == "error: --plots needs matplotlib: pip install matplotlib\n", p.stderr
    assert p.stdout == "" and _files(tmp_path) == before                           # no table, no temp file
    assert not (tmp_path / "figures").exists()                                     # no folder


# Progress a person can follow on long work (data.Progress), and --quiet silencing all of it
def test_progress_time_left_is_the_pace_so_far_for_items_and_runs_and_durations_read_one_way(capsys):
    """k of N items in t s: t (N - k) / k left; runs: mean time x those left, less time run, over runs at once."""
    now = [0.0]
    p = data.Progress("decoding the image cache", 5000, "images", every=0, step=0, clock=lambda: now[0])
    now[0] = 120.0
    p.advance(1200)
    assert p.left() == pytest.approx(120 * (5000 - 1200) / 1200)                        # 380 s
    now[0] = 500.0
    p.advance(3800)
    p.finish()
    assert capsys.readouterr().out.splitlines() == [
        "decoding the image cache: 1200 of 5000 images (24%), 10 images/s, about 6 min 20 s left",
        "decoding the image cache: 5000 images in 8 min 20 s (10 images/s)"]
    assert [data.duration_text(t) for t in (0.42, 9.96, 45, 59.6, 190, 3599, 3600, 7500, 7540)] == \
        ["0.4 s", "10 s", "45 s", "1 min", "3 min 10 s", "59 min 59 s", "1 h", "2 h 5 min", "2 h 6 min"]
    assert [p.pace(n, 10.0) for n in (5000, 25, 4)] == ["500 images/s", "2.5 images/s", "0.4 images/s"]   # slow too
    rate_limited = data.Progress("x", 1000, every=5, clock=lambda: now[0])              # 5 s and 5% at most
    for k in range(1000):
        now[0] += 0.01 if k < 500 else 1.0
        rate_limited.advance()
    lines = capsys.readouterr().out.splitlines()
    assert 9 <= len(lines) <= 20 and all(" of 1000 items (" in line for line in lines)
    runs = data.Progress("train", 4, "runs", clock=lambda: now[0])
    runs.item_done(190, "ad imaging seed0 v0 fold0")
    runs.item_done(10, "ad tabular seed0 v0 fold0")
    runs.item_done(200, "ad imaging seed0 v0 fold1", ": test BA 0.5")
    runs.item_done(300, "ad hyperfusion seed0 v0 fold0")
    lines = capsys.readouterr().out.splitlines()
    assert lines[:3] == [
        "run 1 of 4 done (ad imaging seed0 v0 fold0, 3 min 10 s); about 9 min 30 s left for the 3 still to train",
        "run 2 of 4 done (ad tabular seed0 v0 fold0, 10 s); about 3 min 20 s left for the 2 still to train",
        "run 3 of 4 done (ad imaging seed0 v0 fold1, 3 min 20 s): test BA 0.5; about 2 min 13 s left for the 1 "
        "still to train"]
    assert lines[3].startswith("run 4 of 4 done (ad hyperfusion seed0 v0 fold0, 5 min); all 4 in ")
    two = data.Progress("train", 5, "runs", parallel=2)
    two.item_done(100, "a", spent=40)                   # 4 x 100 s less the 40 s run, on 2 at a time
    assert "about 3 min left for the 4" in capsys.readouterr().out
    quiet = data.Progress("train", 2, "runs", quiet=True)
    quiet.item_done(100, "a")
    quiet_items = data.Progress("x", 3, quiet=True, every=0)
    quiet_items.advance(2)
    quiet_items.finish(always=True)
    assert capsys.readouterr().out == ""


def test_the_first_cache_decode_shows_its_progress_and_a_final_line_and_nothing_when_quiet_or_short(
        tmp_path, monkeypatch, capsys):
    paths = data.read_ad_table(tiny_ad(tmp_path, n=6)).image_paths
    decoding = lambda out: [line for line in out.splitlines() if line.startswith("decoding the image cache")]
    data.ImageCache(paths, tmp_path / "short").prepare()          # a fraction of a second: no line
    assert decoding(capsys.readouterr().out) == []
    monkeypatch.setattr(data.ImageCache, "PROGRESS_EVERY", 0)              # a line as often as 5% allows
    data.ImageCache(paths, tmp_path / "quiet").prepare(progress=False)
    assert capsys.readouterr().out == ""
    cache = data.ImageCache(paths, tmp_path / "cache").prepare()
    lines = decoding(capsys.readouterr().out)
    assert cache.n_decoded == 6 and len(lines) == 6, lines
    for k, line in enumerate(lines[:-1], start=1):
        assert re.fullmatch(rf"decoding the image cache: {k} of 6 images \({100 * k // 6}%\), \S+ images/s, "
                            r"about [\d.]+ s left", line), line
    assert re.fullmatch(r"decoding the image cache: 6 images in [\d.]+ s \(\S+ images/s\)", lines[-1]), lines[-1]


@pytest.mark.parametrize("doing", ["decoding or hashing these images",
                                   "checking or generating the synthetic brain-age cohort"])
def test_a_process_waiting_for_the_lock_another_holds_on_a_cache_or_cohort_says_so_once(doing, tmp_path, monkeypatch,
                                                                                         capsys):
    folder, name, _, _ = synthetic.BUILTIN["brain-age"]
    monkeypatch.setitem(synthetic.BUILTIN, "brain-age", (folder, name, lambda *a, **k: None, {}))  # made at once
    held = os.open(tmp_path, os.O_RDONLY)
    data.fcntl.flock(held, data.fcntl.LOCK_EX)                # flock: another open file's lock, as another process's

    def take():
        if "cohort" in doing:
            return synthetic.builtin_cohort("brain-age", tmp_path, quiet=True)
        with data.cache_lock(tmp_path):
            pass

    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(take)
        with contextlib.suppress(TimeoutError):
            waiting.result(timeout=1)                          # it waits ...
        assert not waiting.done()
        os.close(held)                                         # ... until the holder lets go
        waiting.result(timeout=60)
    assert capsys.readouterr().err == f"waiting for the lock on {tmp_path}: another process holds it ({doing}); " \
                                      f"this one goes on when it is done\n"


def test_run_protocol_says_after_each_run_how_many_are_done_and_the_time_left_and_quiet_says_none(
        tmp_path, monkeypatch, capsys):
    rng = np.random.default_rng(6)
    labels = rng.integers(0, 3, 12)

    def fake_train(args):
        print("a line of the training script's own")
        fake_ad_run(args["out"], args["model"], args["split_seed"], args["version"], args["fold"],
                    random_probs(rng, 12), labels)

    monkeypatch.setattr(train_ad, "train_ad", fake_train)
    fake_ad_run(tmp_path / "loud", "hyperfusion", 0, 0, 0, random_probs(rng, 12), labels)      # one finished
    protocol = ["--task", "ad", "--models", "hyperfusion", "--epochs", "1"]
    evaluate.main(["protocol"] + protocol + ["--runs", str(tmp_path / "loud")])
    done = [line for line in capsys.readouterr().out.splitlines() if line.startswith("run ")]
    assert [re.sub(r"[\d.]+ s\)", "T)", line.split(";")[0]) for line in done] == \
        [f"run {k} of 3 done (ad hyperfusion seed0 v0 fold{k}, T)" for k in (1, 2, 3)]
    assert re.search(r"; about [\d.]+ s left for the 2 still to train$", done[0]), done
    assert done[1].endswith("left for the 1 still to train") and re.search(r"; all 3 in [\d.]+ s$", done[2])
    evaluate.main(["protocol"] + protocol + ["--runs", str(tmp_path / "quiet"), "--quiet"])
    out = capsys.readouterr().out
    assert out.startswith("# ") and "| model |" in out and "wrote " in out, out      # the table alone
    assert not re.search(r"^(run \d|\[\d|a line of|protocol:|total wall time)", out, re.M), out
    assert os.path.isfile(os.path.join(training.ad_run_dir(tmp_path / "quiet", "hyperfusion", 0, 0, 3),
                                       "metrics.json"))
    jobs = lambda: [evaluate.Job(str(tmp_path / f"job{i}"), [sys.executable, "-c", "print('test BA 0.5')"],
                                 label=f"job {i}") for i in range(2)]
    evaluate.run_jobs(jobs(), 2, poll_s=0.02)                  # --jobs 2: the same lines, each run's last line in
    out = capsys.readouterr().out
    assert re.search(r"^run 1 of 2 done \(job \d, [\d.]+ s\): test BA 0\.5; about [\d.]+ s left for the 1 still",
                     out, re.M), out
    evaluate.run_jobs(jobs(), 2, poll_s=0.02, quiet=True)
    assert capsys.readouterr().out == ""


def test_predict_shows_progress_over_its_batches_when_long_one_line_per_member_and_nothing_with_quiet(
        ad_cohort60, tabular_run, tmp_path, monkeypatch, capsys):
    run_dir = _run_dir(tabular_run, "tabular")
    args = [run_dir, "--data-csv", str(ad_cohort60), "--out", str(tmp_path / "p.csv"), "--batch-size", "8"]
    predict.main(args)                                                  # short: the member's line, no batches'
    out = capsys.readouterr().out.splitlines()
    assert re.fullmatch(rf"member 1 of 1 done \({re.escape(run_dir)}, [\d.]+ s\); all 1 in [\d.]+ s", out[0]), out
    assert not any(line.startswith("predicting") for line in out) and out[1].startswith("60 subjects x 1 models")
    monkeypatch.setattr(predict, "PROGRESS_EVERY", 0)                   # long work: a line every batch or so
    predict.main(args)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("predicting")]
    assert len(lines) == 7 and lines[0].startswith("predicting 60 subjects x 1 model: 8 of 60 predictions (13%), ")
    assert all(re.search(r", \S+ predictions/s, about [\d.]+ s left$", line) for line in lines)
    predict.main(args + ["--quiet"])
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and out[0].startswith("60 subjects x 1 models") and out[1].startswith("ensemble on"), out


def test_select_layers_says_its_progress_over_the_draws_and_nothing_of_it_with_quiet(ad_cohort60, monkeypatch, capsys):
    """100 draws of each layer of the AD backbone take about 10 minutes on a CPU."""
    monkeypatch.setattr(evaluate, "Progress", lambda *a, **k: data.Progress(*a, **{**k, "every": 0}))
    for quiet in ([], ["--quiet"]):
        evaluate.main(["select-layers", "--task", "ad", "--data-csv", str(ad_cohort60), "--samples", "2", "--draws",
                       "2", *quiet])
        out = capsys.readouterr().out
        assert (re.search(r"loss entropy: 2 of (\d+) draws .*\n(.*\n)*loss entropy: \1 draws in ", out) is None) == \
            bool(quiet), out


def test_preprocess_the_data_checks_and_the_demo_cohort_say_their_progress_and_nothing_of_it_with_quiet(
        tmp_path, monkeypatch, capsys):
    folder, name, make, _ = synthetic.BUILTIN["ad"]
    monkeypatch.setitem(synthetic.BUILTIN, "ad", (folder, name, make, dict(n=10, seed=0)))
    monkeypatch.setattr(synthetic, "Progress", lambda *a, **k: data.Progress(*a, **{**k, "every": 0}))
    synthetic.builtin_cohort("ad", tmp_path / "quiet", quiet=True)           # train_ad.py --quiet's first use
    assert capsys.readouterr().out == ""
    synthetic.builtin_cohort("ad", tmp_path / "loud")
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("generating the synthetic ad cohort in ") and re.fullmatch(r"generated in [\d.]+ s",
                                                                                        out[-1]), out
    assert "synth-ad: 5 of 10 subjects (50%), " in "\n".join(out)
    csv_path = tiny_ad(tmp_path)
    batch = ["--csv", csv_path, "--out-dir", tmp_path / "pre", "--shape", 6, 6, 6, "--spacing", 2, "--overwrite"]
    out = run_main(preprocess.main, *batch).stdout.splitlines()
    assert re.fullmatch(r"preprocessing: 3 subjects in [\d.]+ s \(\S+ subjects/s\)", out[0]), out
    assert out[1].startswith("wrote ") and len(out) == 2
    assert run_main(preprocess.main, *batch, "--quiet").stdout == ""
    real_progress = data.Progress
    monkeypatch.setattr(data, "Progress", lambda *a, **k: real_progress(*a, **k, every=0))
    out = run_main(data.main, "check-ad", csv_path).stdout
    assert "checking the images: 2 of 3 images (66%), " in out and "checking the images: 3 images in " in out
    out = run_main(data.main, "check-ad", csv_path, "--quiet").stdout
    assert out.startswith("ok: ") and "checking" not in out
