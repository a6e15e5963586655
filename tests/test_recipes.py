"""Named recipes (configs/*.toml): each resolves to its documented settings, later flags win, bad recipes and
bad flags are ConfigErrors naming the flag; run_medclip.sh works under sh; the advisory about PyTorch is gone."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from medclip.evaluation.retrieval import evaluate_retrieval
from medclip.training import recipes
from medclip.training.config_check import ConfigError, eval_metric_names, validate

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("run_hybrid_clip", ROOT / "run_hybrid_clip.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def _parse(*argv):
    return _script().parse(["--output_dir", "out", *argv])


def test_every_recipe_has_its_fields_and_only_real_flags():
    names = recipes.available()
    assert {"medclip", "pubmedclip"} <= set(names)
    for name in names:
        recipe = recipes.load(name)
        assert recipe.name == name and recipe.description and recipe.source and recipe.reports
        validate(*_parse("--recipe", name, "--data_dir", "/data/roco"))  # resolves and passes the check


def test_medclip_recipe_is_the_original_roco_recipe():
    model, data, train = _parse("--recipe", "medclip", "--data_dir", "/data/roco")
    assert model.text_model_name_or_path == "allenai/scibert_scivocab_uncased"
    assert model.vision_model_name_or_path == "openai/clip-vit-base-patch32"
    assert model.tokenizer_name == "allenai/scibert_scivocab_uncased" and model.model_name_or_path is None
    assert (train.learning_rate, train.weight_decay, train.weight_decay_type) == (5e-5, 0.1, "decoupled")
    assert train.lr_schedule == "linear" and train.num_train_epochs == 40 and train.loss == "clip"
    assert train.per_device_train_batch_size == 16 and train.per_device_eval_batch_size == 16
    assert data.max_seq_length == 128 and data.data_dir == "/data/roco" and not data.hflip
    assert train.do_train and train.do_eval and not train.reduce_lr_on_plateau


def test_pubmedclip_recipe_resolves_to_the_papers_settings():
    model, data, train = _parse("--recipe", "pubmedclip", "--data_dir", "/data/roco")
    assert model.model_name_or_path == "openai/clip-vit-base-patch32"
    assert model.text_model_name_or_path is None and model.vision_model_name_or_path is None
    assert train.loss == "clip"  # symmetric 0.5/0.5 cross-entropy
    assert (train.learning_rate, train.weight_decay, train.weight_decay_type) == (1e-5, 5e-4, "l2")
    assert train.adam_epsilon == 1e-8 and train.max_grad_norm == 0.0
    assert train.lr_schedule == "constant" and train.warmup_steps == 0
    assert train.reduce_lr_on_plateau and train.plateau_metric == "eval_loss"
    assert (train.plateau_factor, train.plateau_patience, train.plateau_threshold) == (0.1, 2, 1e-4)
    assert (train.plateau_threshold_mode, train.plateau_cooldown, train.plateau_min_lr) == ("rel", 0, 0.0)
    assert train.metric_for_best_model == "loss" and train.early_stopping_patience == 5
    assert data.hflip and data.crop_scale_min == 0.08 and data.max_seq_length == 77
    assert train.weight_decay_mask == "all"  # torch.optim.Adam's one param group decays every parameter
    assert train.per_device_train_batch_size == 64 and train.num_train_epochs == 50


def test_clip_tf_hybrid_recipe_resolves_to_the_reports_settings():
    model, data, train = _parse("--recipe", "clip-tf-hybrid", "--data_dir", "/data/roco")
    assert model.vision_model_name_or_path == "timm/tf_efficientnetv2_m.in21k_ft_in1k"
    assert model.text_model_name_or_path == "emilyalsentzer/Bio_ClinicalBERT"
    assert data.second_text_field == "concepts" and model.image_size == 128 and model.projection_dropout == 0.1
    assert train.loss == "hybrid" and train.hybrid_alpha == 0.5 and train.weight_decay == 0.0
    assert train.hybrid_form == "report" and not train.hybrid_alpha_learnable
    assert (train.vision_learning_rate, train.learning_rate, train.text_learning_rate) == (1e-3, 1e-4, 1e-5)
    assert train.early_stopping_patience == 5 and train.metric_for_best_model == "loss"
    assert data.min_mean_intensity == 10.0
    assert data.expand_abbreviations and data.remove_stopwords and data.remove_single_letters


def test_clip_medical_caption_recipe_resolves_to_its_settings():
    model, data, train = _parse("--recipe", "clip-medical-caption", "--data_dir", "/data/rocov2")
    assert model.vision_model_name_or_path == "timm/resnet50.a1_in1k" and model.projection_dim == 512
    assert data.max_seq_length == 77 and train.per_device_train_batch_size == 128
    assert (train.learning_rate, train.lr_schedule, train.warmup_steps) == (5e-4, "cosine", 500)
    assert train.weight_decay_type == "decoupled"  # AdamW


def test_pmc_clip_recipe_resolves_to_the_papers_settings():
    model, data, train = _parse("--recipe", "pmc-clip", "--data_dir", "/data/roco")
    assert model.vision_config == "modified_resnet:output_dim=768" and model.vision_head == "none"
    assert model.text_model_name_or_path.startswith("microsoft/BiomedNLP-PubMedBERT") and model.text_pooler == "cls"
    assert train.mlm and train.mlm_probability == 0.15 and model.projection_dim == 768
    assert (train.learning_rate, train.lr_schedule, train.warmup_steps, train.weight_decay) == (1e-4, "cosine", 500, 0.1)
    assert data.crop_scale_min == 0.5 and data.max_seq_length == 77
    assert train.mlm_masking == "whole_word" and train.max_grad_norm == 0.0 and train.weight_decay_mask == "ndim"


def test_later_flags_win_over_the_recipe():
    _, data, train = _parse("--recipe", "pubmedclip", "--learning_rate", "3e-5", "--hflip", "false",
                            "--weight_decay_type", "decoupled", "--data_dir", "/d")
    assert train.learning_rate == 3e-5 and not data.hflip and train.weight_decay_type == "decoupled"
    assert train.weight_decay == 5e-4  # the rest stays the recipe's
    _, _, train = _parse("--recipe=medclip", "--num_train_epochs", "2")
    assert train.num_train_epochs == 2


def test_recipe_list_prints_name_source_and_description():
    proc = subprocess.run([sys.executable, "run_hybrid_clip.py", "--recipe", "list"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    for name in recipes.available():
        recipe = recipes.load(name)
        assert f"{name}\n  source: {recipe.source}\n  {recipe.description}" in proc.stdout


def test_unknown_recipe_lists_the_available_ones():
    with pytest.raises(ConfigError, match=r"--recipe 'nope'.*available: .*medclip.*pubmedclip"):
        _parse("--recipe", "nope")


def test_a_recipe_flag_that_is_not_a_flag_is_named(tmp_path):
    (tmp_path / "typo.toml").write_text('name = "typo"\ndescription = "d"\nsource = "s"\nreports = "r"\n'
                                        '[flags]\nlearning_rat = 1e-4\n')
    with pytest.raises(ConfigError, match="--learning_rat is not a run_hybrid_clip.py flag"):
        recipes.load("typo", tmp_path)
    (tmp_path / "bare.toml").write_text('name = "bare"\n[flags]\n')
    with pytest.raises(ConfigError, match="missing description, source, reports"):
        recipes.load("bare", tmp_path)


def test_deprecated_from_pt_is_accepted_and_ignored():
    model, _, _ = _parse("--from_pt", "--model_preset", "demo", "--do_train")
    assert model.model_preset == "demo" and not hasattr(model, "from_pt")
    model, _, _ = _parse("--from_pt", "false", "--no_from_pt", "--model_preset", "demo")
    assert model.model_preset == "demo"


DEMO = ("--model_preset", "demo", "--do_train", "--synthetic_train_samples", "64")


@pytest.mark.parametrize("flags,named", [
    (("--loss", "focal"), "--loss 'focal'"),
    (("--metric_for_best_model", "t2i_R@3"), "--metric_for_best_model 't2i_R@3'"),
    (("--reduce_lr_on_plateau", "--lr_schedule", "constant", "--plateau_metric", "eval_accuracy"),
     "--plateau_metric 'eval_accuracy'"),
    (("--loss", "sigmoid"), "--loss sigmoid needs a learned logit bias"),
    (("--lr_schedule", "step"), "--lr_schedule 'step'"),
    (("--weight_decay_type", "l1"), "--weight_decay_type 'l1'"),
    (("--freeze_vision", "--freeze_text"), "--freeze_vision and --freeze_text"),
    (("--reduce_lr_on_plateau",), "--reduce_lr_on_plateau needs --lr_schedule constant"),
    (("--reduce_lr_on_plateau", "--lr_schedule", "constant", "--plateau_factor", "1.5"), "--plateau_factor"),
    (("--dtype", "float64"), "--dtype 'float64'"),
    (("--weight_decay_mask", "biases"), "--weight_decay_mask 'biases'"),
    (("--loss", "hybrid", "--hybrid_form", "paper"), "--hybrid_form 'paper'"),
    (("--loss", "hybrid", "--hybrid_form", "report", "--hybrid_temperature", "0.5"), "--hybrid_temperature sets"),
    (("--hybrid_alpha_learnable",), "--hybrid_alpha_learnable learns the alpha of --loss hybrid"),
    (("--loss", "hybrid", "--hybrid_alpha_learnable", "--hybrid_alpha", "1.0"), "--hybrid_alpha_learnable starts"),
    (("--mlm_masking", "whole_word"), "--mlm_weight, --mlm_probability and --mlm_masking"),
    (("--hybrid_temperature", "0"), "--hybrid_temperature"),
    (("--loss", "concept", "--false_negatives", "drop"), "--false_negatives 'drop'"),
    (("--loss", "concept", "--concept_target_weight", "1.5"), "--concept_target_weight"),
    (("--loss", "concept", "--concept_width", "0"), "--concept_width"),
    (("--vision_config", "clip_vison_model:hidden_size=64"), "--vision_config: unknown vision tower 'clip_vison_model'"),
    (("--text_config", "bert:hiden_size=64"), "--text_config: bert has no field 'hiden_size'"),
    (("--vision_config", "clip_vision_model", "--vision_model_name_or_path", "v"),
     "--vision_config and --vision_model_name_or_path"),
])
def test_config_errors_name_their_flag(flags, named):
    from medclip.training.arguments import FlagError  # ranges are checked as the flags are parsed

    with pytest.raises((ConfigError, FlagError), match="^" + named.replace("(", r"\(").replace(")", r"\)")):
        validate(*_parse(*DEMO, *flags))


def test_plateau_needs_validation_data_and_sigmoid_accepts_a_bias():
    with pytest.raises(ConfigError, match="needs validation data"):
        validate(*_parse("--train_file", "t.jsonl", "--do_train", "--model_preset", "demo",
                         "--reduce_lr_on_plateau", "--lr_schedule", "constant"))
    validate(*_parse("--text_model_name_or_path", "t", "--vision_model_name_or_path", "v", "--do_train",
                     "--loss", "sigmoid", "--logit_bias_init", "-10"))


def test_valid_metrics_are_what_evaluation_logs():
    names = eval_metric_names()
    assert names[0] == "loss" and {"t2i_R@5", "i2t_R@10", "t2i_mrr", "i2t_median_rank"} <= set(names)
    pairs = np.eye(3, dtype=np.float32)  # the declared list is exactly what the evaluation computes
    assert names == ["loss", *evaluate_retrieval(pairs, pairs).metrics]
    validate(*_parse(*DEMO, "--metric_for_best_model", "eval_t2i_median_rank"))  # with the prefix too


def test_script_turns_a_config_error_into_exit_code_2():
    proc = subprocess.run([sys.executable, "run_hybrid_clip.py", "--output_dir", "out", *DEMO, "--loss", "focal"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "configuration error: --loss 'focal' is unknown; choose from clip, hybrid, sigmoid" in proc.stderr


# -- run_medclip.sh ----------------------------------------------------------------------------------------

def _sh(*args, shell="sh"):
    env = {**os.environ, "PYTHON": sys.executable}
    return subprocess.run([shell, "run_medclip.sh", *args], cwd=ROOT, capture_output=True, text=True, env=env,
                          timeout=300)


def test_run_medclip_sh_works_under_sh():
    proc = _sh("--recipe", "list")
    assert proc.returncode == 0, proc.stderr
    assert "medclip\n  source:" in proc.stdout and "pubmedclip\n  source:" in proc.stdout
    assert "Illegal option" not in proc.stderr


@pytest.mark.parametrize("args", [("/nonexistent/roco",), ("--recipe",), ("--recipe", "pubmedclip")])
def test_run_medclip_sh_usage_error_exits_2(args):
    proc = _sh(*args)
    assert proc.returncode == 2
    assert proc.stderr.startswith("usage: run_medclip.sh [--recipe NAME|list] [ROCO_ROOT | TRAIN_FILE")


def test_run_medclip_sh_passes_the_recipe_and_an_unknown_recipe_is_named(tmp_path):
    proc = _sh("--recipe", "nope", str(tmp_path), shell="bash")
    assert proc.returncode == 2 and "--recipe 'nope': no such recipe" in proc.stderr


# -- transformers' advisory ---------------------------------------------------------------------------------

# Makes torch invisible to transformers (as on a JAX-only install) in a child interpreter.
HIDE_TORCH = ("import importlib.util as u; f = u.find_spec; "
              "u.find_spec = lambda n, *a, **k: None if n.split('.')[0] == 'torch' else f(n, *a, **k); ")
ADVISORY = "PyTorch was not found"


def _python(code: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRANSFORMERS_NO_ADVISORY_WARNINGS"}
    return subprocess.run([sys.executable, "-c", HIDE_TORCH + code], cwd=ROOT, capture_output=True, text=True,
                          env=env, timeout=300)


def test_no_pytorch_advisory_from_our_tools():
    assert ADVISORY in _python("import transformers").stderr  # the set-up does show it without our tools
    script = _python("import runpy, sys; sys.argv = ['run_hybrid_clip.py', '--recipe', 'list']; "
                     "runpy.run_path('run_hybrid_clip.py', run_name='__main__')")
    assert script.returncode == 0 and "pubmedclip" in script.stdout, script.stderr
    assert ADVISORY not in script.stderr
    cli = _python("import medclip.cli, transformers")
    assert cli.returncode == 0, cli.stderr
    assert ADVISORY not in cli.stderr


# -- the CLIP TensorFlow & ROCO report's three models ------------------------------------------------------
# What the report (R) and its repository's hyperparameters.py (H) state, once; each recipe must resolve to it.
CLIP_TF_REPORT = {
    "image_size": 128,  # R; H img_shape
    "projection_dropout": 0.1,  # R; H projector_dropout_rate
    "vision_learning_rate": 1e-3, "learning_rate": 1e-4, "text_learning_rate": 1e-5,  # R; H lr_*
    "per_device_train_batch_size": 80,  # R; H batch_size (one device)
    "weight_decay": 0.0, "adam_epsilon": 1e-7, "max_grad_norm": 0.0,  # R: Keras' Adam, its defaults
    "num_train_epochs": 20, "early_stopping_patience": 5, "metric_for_best_model": "loss",  # R
    "split_ratios": "68,12,20",  # R; H 0.8 / 0.2, then 0.15 of train for validation
    "seed": 116,  # H SEED
    "remove_words": "year,image,show",  # R "such as year, image, show" (its full list is unpublished)
    "max_seq_length": 128,  # H captions_input_shape
}
CLIP_TF_MODELS = {  # R: base, base + loss variation, final
    "clip-tf-base": ("timm/tf_efficientnetv2_s.in21k_ft_in1k", "distilbert-base-uncased", None, "hybrid", 1.0),
    "clip-tf-base-sparse-ce": ("timm/tf_efficientnetv2_s.in21k_ft_in1k", "distilbert-base-uncased", None, "clip",
                               None),
    "clip-tf-hybrid": ("timm/tf_efficientnetv2_m.in21k_ft_in1k", "emilyalsentzer/Bio_ClinicalBERT", "concepts",
                       "hybrid", 0.5),
}


@pytest.mark.parametrize("name", sorted(CLIP_TF_MODELS))
def test_clip_tf_report_recipes_state_the_reports_values(name):
    model, data, train = _parse("--recipe", name, "--data_dir", "/data/roco")
    resolved = {**vars(model), **vars(data), **vars(train)}
    assert {key: resolved[key] for key in CLIP_TF_REPORT} == CLIP_TF_REPORT
    vision, text, second, loss, alpha = CLIP_TF_MODELS[name]
    assert (model.vision_model_name_or_path, model.text_model_name_or_path) == (vision, text)
    assert (data.second_text_field, train.loss) == (second, loss)
    assert alpha is None or train.hybrid_alpha == alpha
    assert data.min_mean_intensity is not None and data.remove_stopwords and data.remove_single_letters


# -- each recipe against the values its source states ------------------------------------------------------
# One table, written once: for every recipe, the values its source states (flag, value, where the source says
# so) and every deviation (flag or None for a difference no flag expresses, the source's value, ours, why).
# The test checks that each stated value is the recipe's and that each flagged deviation really differs;
# README's deviation list is this table.
# Precision: every source trained on GPUs in fp32 (PubMedCLIP, CLIP-TF, flax-community medclip) or PyTorch AMP
# (PMC-CLIP, --precision amp); every recipe runs --dtype auto: float32 on CPU (as the sources), bfloat16 compute
# with fp32 parameters, optimizer state and loss on TPU/GPU (the deviation); --dtype float32 follows them exactly.
PRECISION = ("dtype", "fp32 (PMC-CLIP: torch AMP, fp16 autocast)", "auto",
             "bf16 compute on TPU/GPU (fp32 on CPU); --dtype float32 follows the sources exactly")

SOURCES = {
    "medclip": {
        "source": "flax-community medclip, github.com/Kaushalya/medclip train_medclip.sh / run_medclip.sh",
        "stated": [
            ("text_model_name_or_path", "allenai/scibert_scivocab_uncased", "train_medclip.sh"),
            ("vision_model_name_or_path", "openai/clip-vit-base-patch32", "train_medclip.sh"),
            ("num_train_epochs", 40, "train_medclip.sh"),
            ("max_seq_length", 128, "train_medclip.sh"),
            ("per_device_train_batch_size", 16, "train_medclip.sh (an earlier run_medclip.sh: 64)"),
            ("learning_rate", 5e-5, "train_medclip.sh"),
            ("warmup_steps", 0, "train_medclip.sh"),
            ("weight_decay", 0.1, "train_medclip.sh, optax.adamw in run_medclip.py"),
            ("weight_decay_type", "decoupled", "optax.adamw"),
            ("lr_schedule", "linear", "run_medclip.py: linear decay to 0"),
        ],
        "deviations": [PRECISION],
    },
    "pubmedclip": {
        "source": "Eslami et al., PubMedCLIP; github.com/sarahESL/PubMedCLIP (configs/medclip_roco_all.yaml, "
                  "lib/utils/utils.py, lib/config/default.py)",
        "stated": [
            ("model_name_or_path", "openai/clip-vit-base-patch32", "the paper: CLIP ViT-B/32 fine-tuned whole"),
            ("learning_rate", 1e-5, "medclip_roco_all.yaml"),
            ("weight_decay", 5e-4, "medclip_roco_all.yaml"),
            ("weight_decay_type", "l2", "torch.optim.Adam(weight_decay=...): added to the gradient"),
            ("weight_decay_mask", "all", "torch.optim.Adam(model.parameters()): one group, every parameter"),
            ("adam_epsilon", 1e-8, "the yaml's EPS 1e-6 is never passed to Adam: torch's default"),
            ("per_device_train_batch_size", 64, "medclip_roco_all.yaml"),
            ("num_train_epochs", 50, "medclip_roco_all.yaml"),
            ("max_seq_length", 77, "CLIP's context"),
            ("crop_scale_min", 0.08, "default.py: RandomResizedCrop, torchvision's scale (0.08, 1)"),
            ("hflip", True, "default.py: RandomHorizontalFlip"),
            ("max_grad_norm", 0.0, "no clipping in the training loop"),
            ("early_stopping_patience", 5, "re-implementations' description: early stopping 5 on val loss"),
            ("metric_for_best_model", "loss", "validation loss"),
            ("reduce_lr_on_plateau", True, "re-implementations' description: ReduceLROnPlateau on val loss"),
            ("plateau_factor", 0.1, "torch's default"),
            ("plateau_threshold", 1e-4, "torch's default"),
        ],
        "deviations": [
            ("loss", "0.7 * image->text + 0.3 * text->image on rescaled logits (released train.py)", "clip",
             "the recipe as the paper and its re-implementations describe it: symmetric 0.5/0.5"),
            ("plateau_patience", 10, 2,
             "not stated; torch's default 10 could never fire before early stopping at 5"),
            (None, "batch 64 on one GPU", "64 per device", "on N devices pass --per_device_train_batch_size 64/N"),
            PRECISION,
        ],
    },
    "pmc-clip": {
        "source": "Lin et al., PMC-CLIP; github.com/WeixiongLin/PMC-CLIP (README.md's training command, "
                  "src/training/{params,main,train}.py, src/training/dataset/utils.py, "
                  "model_configs/RN50_fusion4.json)",
        "stated": [
            ("learning_rate", 1e-4, "README: --lr=1e-4"),
            ("weight_decay", 0.1, "README: --wd=0.1"),
            ("weight_decay_type", "decoupled", "main.py: optim.AdamW"),
            ("weight_decay_mask", "ndim", "main.py: no decay where p.ndim < 2 or bn/ln/bias/logit_scale"),
            ("warmup_steps", 500, "README: --warmup 500"),
            ("lr_schedule", "cosine", "scheduler.py: cosine_lr"),
            ("adam_beta1", 0.9, "params.py get_default_params (RN): beta1 0.9"),
            ("adam_beta2", 0.999, "params.py get_default_params (RN): beta2 0.999"),
            ("adam_epsilon", 1e-8, "params.py get_default_params (RN): eps 1e-8"),
            ("crop_scale_min", 0.5, "README: --crop-scale 0.5"),
            ("max_grad_norm", 0.0, "train.py: backward then optimizer.step, no clipping"),
            ("mlm", True, "README: --mlm"),
            ("mlm_probability", 0.15, "params.py: --mask-ratio 0.15"),
            ("mlm_masking", "whole_word", "dataset/utils.py base_masker: caption.split() words"),
            ("text_mask_padding", False, "pmc_clip.py encode_text: padded to 77, BERT called without a mask"),
            ("max_seq_length", 77, "RN50_fusion4.json: context_length 77"),
            ("projection_dim", 768, "RN50_fusion4.json: embed_dim 768"),
            ("text_pooler", "cls", "pmc_clip.py: the [CLS] hidden state @ text_projection"),
            ("vision_config", "modified_resnet:output_dim=768", "RN50_fusion4.json: RN50 ModifiedResNet"),
            ("per_device_train_batch_size", 64, "params.py: --batch-size 64 per GPU (README: 8 on one GPU, 128)"),
        ],
        "deviations": [
            ("mlm_weight", "0.5 * contrastive + 0.5 * MLM (--loss-weight 0)", 1.0,
             "contrastive + 1.0 * MLM: the same gradient direction, the learning rate scaled by 2"),
            ("num_train_epochs", 100, 20, "README's 100 epochs on PMC-OA; 20 for ROCO's smaller set (our choice)"),
            (None, "re-tokenised string: a random '##' piece becomes several tokens", "one token id",
             "whole-word masking's random branch inserts one vocabulary id (mlm.py)"),
            (None, "--csv-separator default tab for every file", "tab for .tsv, comma for .csv",
             "pass --csv-separator (accepted as an alias of --csv_delimiter) to choose"),
            PRECISION,
        ],
    },
    **{name: {
        "source": "Calonca et al., CLIP TensorFlow & ROCO (CLIP_Tensorflow_report.pdf; hyperparameters.py, "
                  "github.com/Calonca/clip-tensorflow)",
        "stated": [(flag, value, "the report / hyperparameters.py (CLIP_TF_REPORT above)")
                   for flag, value in CLIP_TF_REPORT.items()]
                  + [("vision_model_name_or_path", CLIP_TF_MODELS[name][0], "report: EfficientNetV2 (-S base, -M final)"),
                     ("text_model_name_or_path", CLIP_TF_MODELS[name][1], "report: DistilBERT base, ClinicalBERT final"),
                     ("loss", CLIP_TF_MODELS[name][3], "report: eqs. 2-5 (alpha 1), 6-7, or eq. 8")]
                  + ([("hybrid_form", "report", "report eqs. 1-8: one temperature for logits and soft targets")]
                     if CLIP_TF_MODELS[name][3] == "hybrid" else []),
        "deviations": ([(None, "metrics_losses.py: the repository's code multiplies the two losses and halves the "
                               "similarities", "eq. 8's alpha mix, eq. 4 as printed",
                         "the report's equations are the method")] if CLIP_TF_MODELS[name][3] == "hybrid" else [])
                      + [(None, "batch 80 on one GPU", "80 per device",
                          "on N devices pass --per_device_train_batch_size 80/N"), PRECISION],
    } for name in CLIP_TF_MODELS},
    "medsiglip": {
        "source": "Google Health, MedSigLIP fine-tuning notebook: https://github.com/google-health/medsiglip/blob/main/"
                  "notebooks/fine_tune_with_hugging_face.ipynb",
        "stated": [
            ("model_name_or_path", "google/medsiglip-448", "model_id = 'google/medsiglip-448'"),
            ("num_train_epochs", 2, "num_train_epochs = 2"),
            ("learning_rate", 1e-4, "learning_rate = 1e-4"),
            ("per_device_train_batch_size", 8, "per_device_train_batch_size=8"),
            ("per_device_eval_batch_size", 8, "per_device_eval_batch_size=8"),
            ("gradient_accumulation_steps", 8, "gradient_accumulation_steps=8"),
            ("weight_decay", 0.01, "weight_decay=0.01"),
            ("warmup_steps", 5, "warmup_steps=5"),
            ("lr_schedule", "cosine", "lr_scheduler_type='cosine'"),
            ("weight_decay_type", "decoupled", "transformers Trainer's default optimizer: AdamW"),
            ("adam_beta1", 0.9, "TrainingArguments default"),
            ("adam_beta2", 0.999, "TrainingArguments default"),
            ("adam_epsilon", 1e-8, "TrainingArguments default"),
            ("max_grad_norm", 1.0, "TrainingArguments default"),
            ("max_seq_length", 64, "processor.tokenizer(max_length=64, padding='max_length')"),
            ("train_crop", "center", "Resize((size, size)) only: no random crop"),
            ("hflip", False, "no flips"),
            ("loss", "sigmoid", "SiglipModel(return_loss=True): the sigmoid loss with its learned scale and bias"),
        ],
        "deviations": [
            ("dtype", "float32 (no bf16/fp16 in TrainingArguments)", "auto",
             "bf16 compute on TPU/GPU (fp32 on CPU), fp32 parameters; --dtype float32 follows the notebook"),
            ("remat", False, True, "the 400M towers at 1,024 image tokens: activations recomputed in the backward "
             "pass (the notebook keeps them, on a 40 GB A100)"),
            ("text_mask_padding", True, False, "the notebook's collator passes attention_mask, so SiglipModel masks "
             "the padding in training; MedSigLIP is pretrained without a mask and the setting is saved with the "
             "model, so evaluation computes the same (--text_mask_padding true follows the notebook)"),
            ("weight_decay_mask", "transformers Trainer: every parameter but biases and LayerNorms", "ndim",
             "the same set except logit_scale, which ndim does not decay"),
            (None, "NCT-CRC-HE-100K histology patches, class names as captions", "ROCO captions",
             "the recipe's purpose: MedSigLIP continued on ROCO"),
            (None, "evaluation every 50 steps on 200 validation pairs", "every epoch on the validation split",
             "--eval_epochs counts epochs"),
            (None, "batch 8 x 8 accumulated on one GPU", "8 per device x 8 accumulated",
             "on N devices pass --per_device_train_batch_size 8/N to keep 64 pairs per update"),
        ],
    },
    "roco-small": {
        "source": "benchmarks/quality.py: the setup its PyTorch reference trains (cosine schedule)",
        "stated": [
            ("projection_dim", 256, "ours_argv / reference_main: 256-d projections"),
            ("freeze_text", True, "the locked MiniLM text tower"),
            ("max_seq_length", 48, "max_length=48"),
            ("per_device_train_batch_size", 64, "--batch_size 64"),
            ("learning_rate", 5e-4, "--learning_rate 5e-4"),
            ("weight_decay", 0.1, "--weight_decay 0.1"),
            ("num_train_epochs", 5, "--epochs 5"),
            ("lr_schedule", "cosine", "--reference_schedule cosine"),
        ],
        "deviations": [
            ("loss", "clip", "concept", "concept-aware targets from ROCO's CUIs: better zero-shot and retrieval on "
             "the shared data (README, Quality benchmark)"),
            PRECISION,
        ],
    },
    "clip-medical-caption": {
        "source": "CLIP-for-Medical-Caption (CLIP on ROCOv2 for caption retrieval), as issue 15 summarises it",
        "stated": [
            ("max_seq_length", 77, "CLIP's context"),
            ("projection_dim", 512, "embedding 512"),
            ("learning_rate", 5e-4, "AdamW 5e-4"),
            ("weight_decay_type", "decoupled", "AdamW"),
            ("lr_schedule", "cosine", "linear warmup + cosine"),
            ("per_device_train_batch_size", 128, "batch 128"),
        ],
        "deviations": [
            (None, "image encoder weights unstated", "timm/resnet50.a1_in1k",
             "an ImageNet ResNet-50 (our choice); --vision_model_name_or_path for the ViT variant"),
            PRECISION,
        ],
    },
}


def _all_flags(parsed):
    return {k: v for args in parsed for k, v in vars(args).items()}


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_recipe_matches_what_its_source_states_and_names_every_deviation(name):
    entry = SOURCES[name]
    flags = _all_flags(_parse("--recipe", name, "--data_dir", "/data/roco"))
    for flag, value, where in entry["stated"]:
        assert flags[flag] == value, f"{name}: --{flag} is {flags[flag]!r}, its source states {value!r} ({where})"
    for flag, theirs, ours, why in entry["deviations"]:
        assert why and theirs != ours
        if flag is not None:  # a deviation a flag expresses: the recipe's value is ours, not the source's
            assert flags[flag] == ours and flags[flag] != theirs, (name, flag)


def test_every_recipe_is_in_the_source_table():
    assert set(recipes.available()) <= set(SOURCES), set(recipes.available()) - set(SOURCES)


def test_pmc_clip_csv_flags_are_aliases_of_ours():
    _, data, _ = _parse("--recipe", "pmc-clip", "--train_file", "t.csv", "--csv-separator", "\\t",
                        "--csv-img-key", "filepath", "--csv-caption-key", "title")
    assert (data.csv_delimiter, data.image_column, data.caption_column) == ("\\t", "filepath", "title")
    from medclip.training.arguments import csv_delimiter

    assert csv_delimiter(data.csv_delimiter) == "\t" and csv_delimiter("tab") == "\t" and csv_delimiter(";") == ";"
    with pytest.raises(ConfigError, match="--csv_delimiter"):
        validate(*_parse(*DEMO, "--csv-separator", "ab"))
