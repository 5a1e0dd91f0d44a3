"""qarm's FGCNN against FuxiCTR's own FGCNN on Frappe: test AUC, log loss, training speed, peak memory.

    python benchmarks/peer_fgcnn_fuxictr.py --fuxictr-repo /path/to/FuxiCTR                      # 3 seeds
    FUXICTR_REPO=/path/to/FuxiCTR python benchmarks/peer_fgcnn_fuxictr.py --seeds 0 --epochs 1  # a quick look

**The peer** is FuxiCTR's FGCNN, unmodified: ``model_zoo/FGCNN/src`` of a local clone of
https://github.com/reczoo/FuxiCTR (``--fuxictr-repo`` or ``$FUXICTR_REPO``; it is never copied into this
project), on the ``fuxictr`` package (2.3.10, the ``bench`` extra: ``pip install -c constraints.txt -e
".[bench]"``) for its layers, ``FeatureMap``, ``NpzDataLoader`` and ``BaseModel.fit`` / ``predict``. Skips
with a message (exit 0) when the clone, the package or ``../shared/data/frappe_nfm_partial`` is absent.

**Protocol** (``_frappe.py``, shared with ``peer_fgcnn_frappe.py``): the validation file split 80/20
(``--split-seed``), field codes from the training 80%, the same integer matrix for both models. Same seeds,
embedding size, batch size, ``--epochs`` epochs, Adam (lr 1e-3), no regularisation, the FGCNN sizes of
``_frappe.SETTINGS`` (FuxiCTR: ``channels``, ``kernel_heights``, ``pooling_sizes``, ``recombined_channels``,
``dnn_hidden_units``). Both pool as FuxiCTR does (10 -> 5 -> 3 -> 2 fields, 30 generated features): its
``MaxPool2d(padding=rows % 2)``, so a short window comes first; qarm's ``pooling_round="pad"`` is the same
(``--qarm-pooling up``: the short window last, as before). **Same function**: before training, qarm's FGCNN
loads a FuxiCTR FGCNN's weights (``load_fuxictr_weights``) and both score test rows through their own library's
forward; the largest probability difference is printed and kept in the results. No
early stop: FuxiCTR's ``early_stop_patience`` is set past the epoch count. Conv batch-norm off by default
(``--batch-norm`` turns it on in both; FuxiCTR's own default is on). After each epoch both score the 20%
holdout: the best-AUC epoch is kept, and an epoch without a better AUC divides the learning rate by 10
(FuxiCTR's ``fit``: ``reduce_lr_on_plateau``, min 1e-6; qarm's loop: ``torch.optim.lr_scheduler.
ReduceLROnPlateau`` set the same way, ``--no-lr-decay`` to drop it). The kept epoch is scored on the test file
(``sklearn.metrics.roc_auc_score``, ``log_loss``). Both clip the gradient norm at 10 (FuxiCTR's ``fit``;
qarm's loop: ``--qarm-clip``). qarm's FGCNN uses FuxiCTR's initialisation (``FGCNNConfig(init="xavier")``,
``--qarm-init``). Evaluation runs in batches of ``--batch-size`` for both (FuxiCTR's loaders use one size).

**Models** (``--models``): ``qarm_fgcnn`` (float32), ``qarm_fgcnn_bf16`` (the same model and loop under qarm's
``precision="bf16"``: ``qarm.precision.autocast`` around the forward, bfloat16 matrix products, float32
weights, Adam state and loss; scored in float32) and ``fuxictr_fgcnn``.

**Calibration.** Every run also reports its test log loss after temperature scaling (``qarm.train.calibration``,
``--calibration platt`` for Platt scaling) fitted on the kept epoch's holdout logits, the rows the epoch was
chosen on, never test rows; the AUC is unchanged. For FuxiCTR the same fit is applied to its outputs (FuxiCTR
has no such step: its own result is the raw log loss). The per-epoch holdout AUC and log loss of every run
are in the results.

**Measured.** Each (model, seed) runs in its own fresh process on one torch thread (FuxiCTR's loader with
``num_workers=0``, so no second process does its batching):

* ``fit ex/s``: training examples per second of each library's own training loop (FuxiCTR: one ``fit`` call
  over all epochs, minus the time of its per-epoch ``eval_step``: holdout scoring, checkpoint, lr decay;
  qarm: a plain loop over index-sliced batches), holdout evaluation excluded for both;
* ``peak RSS``: the process's resident memory sampled every 5 ms from before the model is built to the end
  of training and testing, minus the value before (psutil RSS; tracemalloc does not see torch's tensors);
* ``parameters``: trainable parameter count.

The machine is shared (other jobs run on the same cores): the load average is printed beside the results.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _frappe import (
    FOLDER,
    SETTINGS,
    PeakRSS,
    common_args,
    data_info,
    frappe_folder,
    load,
    load_text,
    machine,
    medians,
    parser,
    run_workers,
)

MODELS = ("qarm_fgcnn", "qarm_fgcnn_bf16", "fuxictr_fgcnn", "fuxictr_fgcnn_qarm_loop")
DEFAULT_MODELS = MODELS[:3]  # fuxictr_fgcnn_qarm_loop (a diagnostic: FuxiCTR's module in qarm's loop) on request
PRECISION = {"qarm_fgcnn": "fp32", "qarm_fgcnn_bf16": "bf16"}
METRICS = ("test_auc", "test_logloss", "test_logloss_calibrated", "fit_examples_per_s", "peak_rss_mib", "parameters")
LR, MIN_LR, DECAY = 1e-3, 1e-6, 0.1  # FuxiCTR's BaseModel.lr_decay(factor=0.1, min_lr=1e-6)
GOAL_SEEDS = 3  # the goal: medians of seeds 0-2; more seeds (--seeds) add the paired per-seed comparison


def fuxictr_repo(args: argparse.Namespace) -> Path | None:
    path = args.fuxictr_repo or os.environ.get("FUXICTR_REPO")
    if not path:
        return None
    source = Path(path).expanduser() / "model_zoo" / "FGCNN" / "src"
    return source.parent.parent.parent if (source / "__init__.py").is_file() else None


def fuxictr_fgcnn_class(repo: Path):
    """``FGCNN`` from the clone's ``model_zoo/FGCNN/src``, imported as a package of its own name."""
    source = repo / "model_zoo" / "FGCNN" / "src"
    spec = importlib.util.spec_from_file_location("fuxictr_model_zoo_fgcnn", source / "__init__.py",
                                                  submodule_search_locations=[str(source)])
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module.FGCNN


# -- qarm --------------------------------------------------------------------------------------------


def run_qarm(data: dict[str, np.ndarray], seed: int, args: argparse.Namespace, precision: str = "fp32") -> dict:
    import torch

    torch.manual_seed(seed)
    model = build_qarm(data, args, args.qarm_pooling)
    out = qarm_loop(model, lambda codes: model(codes)[:, 0], "logits", data, seed, args, precision)
    return {**out, "generated_features": model.network.n_generated}


def build_qarm(data: dict[str, np.ndarray], args: argparse.Namespace, pooling_round: str):
    """qarm's FGCNN for the Frappe codes, the benchmark's sizes and options."""
    from qarm.models.fgcnn import FGCNN, FGCNNConfig

    config = FGCNNConfig(embedding_dim=args.dim, pooling_round=pooling_round, batch_norm=args.batch_norm,
                         init=args.qarm_init, **SETTINGS)
    return FGCNN([int(s) for s in data["sizes"]], 1, config)


def run_fuxictr_in_qarm_loop(data: dict[str, np.ndarray], seed: int, args: argparse.Namespace, tmp: Path) -> dict:
    """FuxiCTR's FGCNN module, built and initialised as in its own run (same seed: the same initial weights),
    trained by qarm's loop instead of its ``fit`` (its own loss on its probabilities): what the loop alone does."""
    model, _, names = build_fuxictr(data, seed, args, tmp)
    out = qarm_loop(model, lambda codes: fuxictr_probabilities(model, names, codes), "probabilities", data, seed,
                    args, "fp32")
    return {**out, "generated_features": fuxictr_generated_features(model, len(names), args)}


def qarm_loop(model, forward, outputs: str, data: dict[str, np.ndarray], seed: int, args: argparse.Namespace,
              precision: str) -> dict:
    """The qarm side's training: fused Adam, a fresh permutation per (seed, epoch), ``ReduceLROnPlateau`` on the
    holdout AUC, clipping, the best-AUC epoch restored. ``forward(codes) -> (B,)`` logits or (``outputs=
    "probabilities"``, FuxiCTR's module) sigmoid outputs, trained with the matching binary cross-entropy."""
    import torch
    import torch.nn.functional as F

    from qarm.precision import autocast

    def scores(codes: np.ndarray) -> np.ndarray:  # float32 inference (bf16 logits would tie many rows)
        model.eval()
        with torch.no_grad():
            out = torch.cat([forward(torch.from_numpy(codes[s:s + args.batch_size]))
                             for s in range(0, len(codes), args.batch_size)])
        model.train()
        return out.double().numpy() if outputs == "logits" else _logit(out.numpy())

    optimizer = torch.optim.Adam(model.parameters(), lr=LR, fused=True)  # as qarm's trainer
    decay = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=DECAY, patience=0,
                                                       threshold=1e-6, threshold_mode="abs", min_lr=MIN_LR)
    codes, labels = torch.from_numpy(data["train"]), torch.from_numpy(data["y_train"]).float()
    loss_fn = F.binary_cross_entropy_with_logits if outputs == "logits" else F.binary_cross_entropy
    train_seconds, history, losses, lrs, best = 0.0, [], [], [], (-1.0, -1, None)
    for epoch in range(args.epochs):
        start = time.perf_counter()
        order = torch.from_numpy(np.random.default_rng([seed, epoch]).permutation(len(codes)))
        for rows in order.split(args.batch_size):
            with autocast(precision):  # qarm.precision, as qarm's trainer (TrainConfig.precision)
                out = forward(codes[rows])
            loss = loss_fn(out.float(), labels[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if args.qarm_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.qarm_clip)
            optimizer.step()
        train_seconds += time.perf_counter() - start
        z = scores(data["holdout"])
        auc = float(roc_auc(data["y_holdout"], z))
        history.append(round(auc, 5))
        losses.append(round(logloss(data["y_holdout"], z), 5))
        lrs.append(optimizer.param_groups[0]["lr"])
        if auc > best[0] + 1e-6:
            best = (auc, epoch, copy.deepcopy(model.state_dict()))
        if not args.no_lr_decay:
            decay.step(auc)
    model.load_state_dict(best[2])
    return {"test_logits": scores(data["test"]), "holdout_logits": scores(data["holdout"]),
            "train_seconds": train_seconds, "holdout_auc": history, "holdout_logloss": losses, "lr": lrs,
            "best_epoch": best[1] + 1, "model": model, "precision": precision}


# -- FuxiCTR -----------------------------------------------------------------------------------------


def build_fuxictr(data: dict[str, np.ndarray], seed: int, args: argparse.Namespace, tmp: Path):
    """FuxiCTR's FGCNN for qarm's Frappe codes (one categorical feature ``f<i>`` per field, the codes as its
    indices) and the feature map it reads them through."""
    from fuxictr.features import FeatureMap
    from fuxictr.pytorch.torch_utils import seed_everything

    FGCNN = fuxictr_fgcnn_class(fuxictr_repo(args))
    names = [f"f{i}" for i in range(data["train"].shape[1])]
    feature_map = FeatureMap("frappe", str(tmp))
    feature_map.features.update((name, {"source": "", "type": "categorical", "vocab_size": int(size)})
                                for name, size in zip(names, data["sizes"]))
    feature_map.labels = ["label"]
    feature_map.num_fields = feature_map.get_num_fields()
    feature_map.set_column_index()
    seed_everything(seed)
    model = FGCNN(feature_map, model_id=f"FGCNN_seed{seed}", gpu=-1, learning_rate=LR, embedding_dim=args.dim,
                  channels=list(SETTINGS["channels"]), kernel_heights=list(SETTINGS["kernel_heights"]),
                  pooling_sizes=list(SETTINGS["pooling"]), recombined_channels=list(SETTINGS["new_features"]),
                  conv_batch_norm=args.batch_norm, dnn_hidden_units=list(SETTINGS["hidden"]),
                  embedding_regularizer=0, net_regularizer=0, net_dropout=0, optimizer="adam",
                  loss="binary_crossentropy", metrics=["AUC", "logloss"], monitor="AUC", monitor_mode="max",
                  early_stop_patience=args.epochs + 1, reduce_lr_on_plateau=not args.no_lr_decay,
                  model_root=str(tmp / "checkpoints"), verbose=0)
    return model, feature_map, names


def load_fuxictr_weights(qarm_model, fuxictr_model) -> None:
    """Copy a FuxiCTR FGCNN's parameters into qarm's (``pooling_round="pad"``, separate embeddings, linear head):
    the per-field tables stacked in field order (qarm's one table with offsets), the convolutions' ``(C_out,
    C_in, h, 1)`` kernels squeezed, each recombination's input columns reordered from FuxiCTR's ``(channel, row,
    dim)`` flattening to qarm's ``(dim, row, channel)`` (both read their outputs as ``(feature, dim)``), the MLP
    and output layer as they are."""
    import torch

    fux, net = fuxictr_model, qarm_model.network
    names = list(fux.feature_map.features)
    with torch.no_grad():
        for mine, theirs in ((qarm_model.embedding, fux.embedding_layer),
                             (qarm_model.generation_embedding, fux.fg_embedding_layer)):
            tables = theirs.embedding_layer.embedding_layers
            mine.table.weight.copy_(torch.cat([tables[name].weight for name in names]))
        for conv, block in zip(net.generation.convs, fux.fgcnn_layer.conv_layers):
            conv.weight.copy_(block[0].weight[..., 0])
            conv.bias.copy_(block[0].bias)
        for dense, block, rows, channels in zip(net.generation.recombine, fux.fgcnn_layer.recombine_layers,
                                                net.generation.rows, fux.fgcnn_layer.channels[1:]):
            weight = block[0].weight.view(-1, channels, rows, net.generation.dim)  # FuxiCTR: (out, c, row, k)
            dense.weight.copy_(weight.permute(0, 3, 2, 1).reshape(dense.weight.shape))  # qarm: (out, k, row, c)
            dense.bias.copy_(block[0].bias)
        linears = [layer for layer in fux.dnn.mlp if isinstance(layer, torch.nn.Linear)]
        for mine, theirs in zip([*(layer for layer in net.mlp if isinstance(layer, torch.nn.Linear)), net.head],
                                linears, strict=True):
            mine.weight.copy_(theirs.weight)
            mine.bias.copy_(theirs.bias)


def same_function_check(data: dict[str, np.ndarray], args: argparse.Namespace, rows: int = 4096,
                        pooling_round: str = "pad") -> dict:
    """qarm's FGCNN (FuxiCTR's padding: ``pooling_round="pad"``) with a FuxiCTR FGCNN's weights against that
    FuxiCTR model, each through its own library's forward, on the first ``rows`` test rows: the largest
    difference of their probabilities (FuxiCTR's output is a sigmoid; qarm's logits go through one). FuxiCTR's
    embeddings are redrawn N(0, 0.5) first: at its N(0, 1e-4) initialisation every output is ~the same."""
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        fux, _, names = build_fuxictr(data, 0, args, Path(tmp))
    with torch.no_grad():
        for name, param in fux.named_parameters():
            if "embedding" in name:
                param.normal_(0.0, 0.5)
    mine = build_qarm(data, args, pooling_round)
    load_fuxictr_weights(mine, fux)
    codes = torch.from_numpy(data["test"][:rows])
    fux.eval(), mine.eval()
    with torch.no_grad():
        theirs = fuxictr_probabilities(fux, names, codes).double()
        ours = torch.sigmoid(mine(codes)[:, 0].double())
    return {"rows": len(codes), "max_abs_probability_difference": float((theirs - ours).abs().max()),
            "probability_range": [float(theirs.min()), float(theirs.max())]}


def run_fuxictr(data: dict[str, np.ndarray], seed: int, args: argparse.Namespace, tmp: Path) -> dict:
    from fuxictr.pytorch.dataloaders import RankDataLoader

    n_fields = data["train"].shape[1]
    model, feature_map, names = build_fuxictr(data, seed, args, tmp)
    paths = {}
    for split in ("train", "holdout", "test"):
        paths[split] = str(tmp / f"{split}.npz")
        np.savez(paths[split], label=data[f"y_{split}"], **{n: data[split][:, i] for i, n in enumerate(names)})
    os.makedirs(model.model_dir, exist_ok=True)
    train_gen, valid_gen, test_gen = RankDataLoader(feature_map, stage="both", train_data=paths["train"],
                                                    valid_data=paths["holdout"], test_data=paths["test"],
                                                    batch_size=args.batch_size, shuffle=True, num_workers=0)
    eval_seconds, history, losses, lrs = [0.0], [], [], []
    eval_step, evaluate = model.eval_step, model.evaluate

    def timed_eval_step() -> None:  # holdout scoring, checkpoint, lr decay: not training time
        start = time.perf_counter()
        eval_step()
        lrs.append(model.optimizer.param_groups[0]["lr"])
        eval_seconds[0] += time.perf_counter() - start

    def recorded_evaluate(data_generator, metrics=None) -> dict:  # fit asks for its monitor (AUC): add logloss
        logs = evaluate(data_generator, metrics=["AUC", "logloss"])
        history.append(float(logs["AUC"]))
        losses.append(round(float(logs["logloss"]), 5))
        return logs

    model.eval_step, model.evaluate = timed_eval_step, recorded_evaluate
    start = time.perf_counter()
    model.fit(train_gen, epochs=args.epochs, validation_data=valid_gen)  # ends by loading the best checkpoint
    train_seconds = time.perf_counter() - start - eval_seconds[0]
    best, best_epoch = -np.inf, 0
    for epoch, auc in enumerate(history):  # the checkpoint fit keeps: better by more than its min_delta, 1e-6
        if auc >= best + 1e-6:
            best, best_epoch = auc, epoch + 1
    return {"test_logits": _logit(model.predict(test_gen)), "holdout_logits": _logit(model.predict(valid_gen)),
            "train_seconds": train_seconds, "holdout_auc": [round(a, 5) for a in history], "holdout_logloss": losses,
            "lr": lrs, "best_epoch": best_epoch, "model": model,
            "generated_features": fuxictr_generated_features(model, n_fields, args)}


def fuxictr_probabilities(model, names: list[str], codes):
    """FuxiCTR's forward on a ``(B, F)`` code matrix (one feature ``names[i]`` per column): ``(B,)`` sigmoids."""
    return model({name: codes[:, i] for i, name in enumerate(names)})["y_pred"][:, 0]


def fuxictr_generated_features(model, n_fields: int, args: argparse.Namespace) -> int:
    """The features FuxiCTR's FGCNN generates, by its own count (``compute_input_dim``)."""
    total = model.compute_input_dim(args.dim, n_fields, list(SETTINGS["channels"]), list(SETTINGS["pooling"]),
                                    list(SETTINGS["new_features"]))[1]
    return int(total) - n_fields


def _logit(probabilities: np.ndarray) -> np.ndarray:
    """FuxiCTR's predictions are sigmoid outputs: back to logits (float64), in the same order."""
    p = np.clip(np.asarray(probabilities, dtype=np.float64).ravel(), 1e-12, 1 - 1e-12)  # float32 0 and 1: ties kept
    return np.log(p) - np.log1p(-p)


# -- one (model, seed) in its own process ------------------------------------------------------------


def roc_auc(y: np.ndarray, scores: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, scores))


def logloss(y: np.ndarray, logits: np.ndarray) -> float:
    """The log loss of ``sigmoid(logits)``, probabilities clipped to [1e-7, 1 - 1e-7] (as FuxiCTR's metric)."""
    from sklearn.metrics import log_loss

    return float(log_loss(y, np.clip(1 / (1 + np.exp(-logits)), 1e-7, 1 - 1e-7), labels=[0, 1]))


def worker(name: str, seed: int, args: argparse.Namespace) -> dict:
    import sklearn.metrics  # noqa: F401 - the metrics' import before the memory baseline (FuxiCTR's imports hold it)
    import torch

    from qarm.train.calibration import fit_calibration

    torch.set_num_threads(1)
    data = load(args.split_seed)
    if name.startswith("fuxictr"):
        import fuxictr.pytorch.models  # noqa: F401 - imported before the memory baseline, like qarm's modules
    import qarm.models.fgcnn  # noqa: F401
    with tempfile.TemporaryDirectory() as tmp, PeakRSS() as memory:
        if name in PRECISION:
            out = run_qarm(data, seed, args, PRECISION[name])
        elif name == "fuxictr_fgcnn_qarm_loop":
            out = run_fuxictr_in_qarm_loop(data, seed, args, Path(tmp))
        else:
            out = run_fuxictr(data, seed, args, Path(tmp))
    test, holdout, model = out.pop("test_logits"), out.pop("holdout_logits"), out.pop("model")
    # Temperature scaling (qarm.train.calibration), fitted on the holdout rows the epoch was chosen on, never on test
    # rows; the same fit on FuxiCTR's outputs is reported beside (FuxiCTR itself has no calibration step).
    calibration = fit_calibration(holdout, data["y_holdout"], args.calibration)
    calibrated = calibration.apply(test)
    return {"model": name, "seed": seed, "test_auc": roc_auc(data["y_test"], test),
            "test_logloss": logloss(data["y_test"], test),
            "test_auc_calibrated": roc_auc(data["y_test"], calibrated),
            "test_logloss_calibrated": logloss(data["y_test"], calibrated),
            "holdout_logloss_kept": logloss(data["y_holdout"], holdout),
            "holdout_logloss_kept_calibrated": logloss(data["y_holdout"], calibration.apply(holdout)),
            "calibration": calibration.to_dict(),
            "fit_examples_per_s": len(data["train"]) * args.epochs / out["train_seconds"],
            "peak_rss_mib": memory.delta_mib,
            "parameters": int(sum(p.numel() for p in model.parameters() if p.requires_grad)), **out}


# -- the whole run -----------------------------------------------------------------------------------


def main() -> int:
    p = parser(__doc__, MODELS)
    p.add_argument("--fuxictr-repo", type=Path, help="a clone of reczoo/FuxiCTR (default: $FUXICTR_REPO)")
    p.add_argument("--batch-norm", action="store_true", help="conv batch-norm on, in both models")
    p.add_argument("--no-lr-decay", action="store_true", help="no lr decay on plateau, in both models")
    p.add_argument("--qarm-clip", type=float, default=10.0,
                   help="clip qarm's gradient norm at this value, as FuxiCTR's fit (max_gradient_norm=10); 0: off")
    p.add_argument("--qarm-pooling", choices=("pad", "up"), default="pad",
                   help="qarm's FGCNNConfig.pooling_round (pad: FuxiCTR's padded max-pooling, the same function)")
    p.add_argument("--qarm-init", choices=("torch", "xavier"), default="xavier",
                   help="qarm's FGCNNConfig.init (xavier: FuxiCTR's scheme)")
    p.add_argument("--calibration", choices=("temperature", "platt"), default="temperature",
                   help="qarm.train.calibration method fitted on the holdout rows (reported beside the raw log loss)")
    p.add_argument("--models", default=",".join(DEFAULT_MODELS),
                   help=f"comma-separated subset of {', '.join(MODELS)} (qarm_fgcnn_bf16: qarm's precision='bf16'; "
                        f"fuxictr_fgcnn_qarm_loop: FuxiCTR's module, its own initial weights, trained by qarm's loop)")
    p.add_argument("--name", default="peer_fgcnn_fuxictr", help="results file names (.md, .json) under --out")
    args = p.parse_args()

    if args.worker:
        args.result.write_text(json.dumps(worker(args.worker, args.seed, args)))
        return 0

    if frappe_folder() is None:
        print(f"SKIPPED: ../shared/data/{FOLDER} is absent (set QARM_SHARED_DATA to the shared data folder).")
        return 0
    repo = fuxictr_repo(args)
    if repo is None:
        print("SKIPPED: no FuxiCTR clone: pass --fuxictr-repo PATH or set FUXICTR_REPO to a clone of "
              "https://github.com/reczoo/FuxiCTR (it needs model_zoo/FGCNN/src).")
        return 0
    try:
        import fuxictr.pytorch.models  # noqa: F401
    except ImportError as err:
        print(f'SKIPPED: the fuxictr package is not installed or broken ({err}); pip install -c constraints.txt '
              f'-e ".[bench]".')
        return 0

    seeds = [int(s) for s in args.seeds.split(",")]
    models = [m for m in args.models.split(",") if m]
    unknown = sorted(set(models) - set(MODELS))
    if unknown or "fuxictr_fgcnn" not in models or not set(models) & set(PRECISION):
        p.error(f"--models: a subset of {', '.join(MODELS)} with fuxictr_fgcnn and a qarm model; got {args.models!r}")
    data = load(args.split_seed)
    commit = _git_head(repo)
    same = same_function_check(data, args, pooling_round=args.qarm_pooling)
    print(f"same function: qarm's FGCNN (pooling_round={args.qarm_pooling!r}) with FuxiCTR's weights, {same['rows']:,} "
          f"test rows: largest probability difference {same['max_abs_probability_difference']:.2e}")
    info = {"machine": machine(["fuxictr"]), "data": data_info(data),
            "config": {"embedding_dim": args.dim, "batch_size": args.batch_size, "epochs": args.epochs,
                       "optimizer": f"Adam lr {LR:g}", "selection": "best holdout AUC epoch",
                       "lr_decay": None if args.no_lr_decay else f"x{DECAY:g} per epoch without a better "
                                                                 f"holdout AUC, min {MIN_LR:g}",
                       "batch_norm": args.batch_norm, "qarm_pooling": args.qarm_pooling, "qarm_init": args.qarm_init,
                       "qarm_clip_grad_norm": args.qarm_clip, "split_seed": args.split_seed,
                       "calibration": f"{args.calibration} scaling (qarm.train.calibration) fitted on the holdout rows",
                       "models": models,
                       "seeds": seeds, "fgcnn": SETTINGS, "fuxictr_repo": str(repo), "fuxictr_commit": commit},
            "same_function": same}
    print(json.dumps(info, indent=1))
    worker_args = [*common_args(args), "--fuxictr-repo", str(repo), "--qarm-init", args.qarm_init,
                   "--qarm-pooling", args.qarm_pooling,
                   "--qarm-clip", str(args.qarm_clip), "--calibration", args.calibration,
                   *(["--batch-norm"] if args.batch_norm else []), *(["--no-lr-decay"] if args.no_lr_decay else [])]
    runs = run_workers(__file__, models, seeds, worker_args,
                       lambda run: f"test AUC {run['test_auc']:.4f}  logloss {run['test_logloss']:.4f} "
                                   f"(calibrated {run['test_logloss_calibrated']:.4f})  "
                                   f"fit {run['fit_examples_per_s']:,.0f} ex/s  peak RSS +{run['peak_rss_mib']:.0f} "
                                   f"MiB  {run['parameters']:,} parameters  best epoch {run['best_epoch']}")
    summary = summarise(runs, models)
    if len(seeds) > GOAL_SEEDS:  # the goal is judged on the first three seeds; the others show the spread
        summary["first_seeds"] = summarise([r for r in runs if r["seed"] in seeds[:GOAL_SEEDS]], models)
        summary["first_seeds"]["seeds"] = seeds[:GOAL_SEEDS]
    report = {**info, "runs": runs, "summary": summary, "load_average_end": list(os.getloadavg())}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(report, indent=1) + "\n")
    markdown = to_markdown(report)
    (args.out / f"{args.name}.md").write_text(markdown)
    print(markdown)
    return 0


def _git_head(repo: Path) -> str | None:
    import subprocess

    try:
        return subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def summarise(runs: list[dict], models: list[str]) -> dict:
    """Medians per model, and per qarm model its ratios to FuxiCTR and the goals: AUC >= FuxiCTR's, log loss <=
    FuxiCTR's (raw, and with qarm's calibration against FuxiCTR's raw output: FuxiCTR has no calibration),
    fit speed >= 2x, peak memory <= FuxiCTR's."""
    med = medians(runs, models, METRICS)
    f = med["fuxictr_fgcnn"]
    ratios, goals = {}, {}
    for name in (m for m in models if m in PRECISION):
        q = med[name]
        ratios[name] = {k: q[k] / f[k] for k in METRICS}
        goals[name] = {"auc_at_least_fuxictr": q["test_auc"] >= f["test_auc"],
                       "logloss_at_most_fuxictr": q["test_logloss"] <= f["test_logloss"],
                       "calibrated_logloss_at_most_fuxictr": q["test_logloss_calibrated"] <= f["test_logloss"],
                       "fit_speed_at_least_2x": ratios[name]["fit_examples_per_s"] >= 2.0,
                       "peak_memory_at_most_fuxictr": q["peak_rss_mib"] <= f["peak_rss_mib"]}
    return {"medians": med, "ratios_over_fuxictr": ratios, "goal": goals, "paired": paired(runs, models)}


def paired(runs: list[dict], models: list[str]) -> dict:
    """Per qarm model, seed by seed against FuxiCTR on the same seed: the median difference of test AUC and raw
    and calibrated log loss, how many seeds qarm is better on, and the two-sided sign test's p-value (are the
    differences centred on zero?)."""
    fux = {r["seed"]: r for r in runs if r["model"] == "fuxictr_fgcnn"}
    out = {}
    for name in (m for m in models if m in PRECISION):
        mine = {r["seed"]: r for r in runs if r["model"] == name and r["seed"] in fux}
        result = {"seeds": len(mine)}
        for key, better in (("test_auc", 1), ("test_logloss", -1), ("test_logloss_calibrated", -1)):
            diffs = [mine[s][key] - fux[s][key] for s in sorted(mine)]
            wins = sum(better * d > 0 for d in diffs)
            ties = sum(d == 0 for d in diffs)
            result[key] = {"median_difference": statistics.median(diffs) if diffs else None, "qarm_better": wins,
                           "sign_test_p": sign_test(wins, len(diffs) - ties)}
        out[name] = result
    return out


def sign_test(wins: int, n: int) -> float:
    """Two-sided p-value of ``wins`` successes in ``n`` fair coin flips (exact binomial)."""
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(0, min(wins, n - wins) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def to_markdown(report: dict) -> str:
    s, m, d, c = report["summary"], report["machine"], report["data"], report["config"]
    start_load = load_text(m["load_average"])
    lines = ["# qarm FGCNN vs FuxiCTR's FGCNN on Frappe", "",
             (f"Machine: {m['platform']}, {m['cpu_count']} CPUs, shared with other jobs (load average "
              f"{start_load} at the start, {load_text(report['load_average_end'])} at the end), Python "
              f"{m['python']}, torch {m['torch']}, fuxictr {m['fuxictr']} (FGCNN from model_zoo of "
              f"reczoo/FuxiCTR {str(c['fuxictr_commit'])[:10]}), 1 torch thread per run."),
             (f"Data: Frappe, train {d['train']:,} / holdout {d['holdout']:,} (80/20 of the validation file, split "
              f"seed {c['split_seed']}), test {d['test']:,}; {d['fields']} fields."),
             (f"Config: embedding {c['embedding_dim']}, batch {c['batch_size']}, {c['epochs']} epochs, no early stop, "
              f"best holdout AUC epoch kept; Adam lr 1e-3, lr decay: {c['lr_decay']}; conv batch-norm "
              f"{'on' if c['batch_norm'] else 'off'}; qarm's pooling_round {c.get('qarm_pooling', 'up')!r} "
              f"(FuxiCTR pads); FGCNN {c['fgcnn']}; seeds {c['seeds']}. "
              f"Calibrated: {c['calibration']} (test rows never used); qarm_fgcnn_bf16: qarm's precision='bf16' "
              f"(bfloat16 autocast of the matrix products in training, float32 weights; float32 inference)."),
             *([f"Same function: qarm's FGCNN with a FuxiCTR FGCNN's weights (embeddings redrawn N(0, 0.5)) gives its "
                f"probabilities to {report['same_function']['max_abs_probability_difference']:.1e} on "
                f"{report['same_function']['rows']:,} test rows, each through its own library's forward."]
               if "same_function" in report else []),
             "",
             ("| model | seed | test AUC | test logloss | calibrated logloss | temperature | fit ex/s | peak RSS (MiB) "
              "| parameters | best epoch | load after |"),
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(report["runs"], key=lambda r: (r["model"], r["seed"])):
        lines.append(f"| {r['model']} | {r['seed']} | {r['test_auc']:.4f} | {r['test_logloss']:.4f} | "
                     f"{r['test_logloss_calibrated']:.4f} | {1 / r['calibration']['scale'][0]:.2f} | "
                     f"{r['fit_examples_per_s']:,.0f} | {r['peak_rss_mib']:.0f} | {r['parameters']:,} | "
                     f"{r['best_epoch']} | {r['load_average_after'][0]:.2f} |")
    for name, v in s["medians"].items():
        lines.append(f"| **{name}** | median | {v['test_auc']:.4f} | {v['test_logloss']:.4f} | "
                     f"{v['test_logloss_calibrated']:.4f} | | {v['fit_examples_per_s']:,.0f} | {v['peak_rss_mib']:.0f} | "
                     f"{v['parameters']:,.0f} | | |")
    for name, r in s["ratios_over_fuxictr"].items():
        lines.append(f"| **{name} / FuxiCTR** | median | {r['test_auc']:.4f} | {r['test_logloss']:.3f} | "
                     f"{r['test_logloss_calibrated']:.3f} | | {r['fit_examples_per_s']:.2f}x | {r['peak_rss_mib']:.2f}x | "
                     f"{r['parameters']:.3f} | | |")
    lines += ["", "Goals (qarm model against FuxiCTR's medians; calibrated: qarm's calibrated log loss against "
              "FuxiCTR's raw one):", ""]
    lines += [f"* {name}: {goal}" for name, goal in s["goal"].items()]
    if "first_seeds" in s:
        first = s["first_seeds"]
        lines += ["", f"The same on seeds {first['seeds']} only (the issue's goal), medians:", ""]
        for name, v in first["medians"].items():
            lines.append(f"* {name}: test AUC {v['test_auc']:.4f}, log loss {v['test_logloss']:.4f} (calibrated "
                         f"{v['test_logloss_calibrated']:.4f}), fit {v['fit_examples_per_s']:,.0f} ex/s, peak "
                         f"{v['peak_rss_mib']:.0f} MiB")
        lines += [f"* {name}: {goal}" for name, goal in first["goal"].items()]
    lines += ["", "Seed by seed against FuxiCTR on the same seed (qarm minus FuxiCTR; sign test: two-sided, exact):",
              "", "| model | seeds | AUC: median diff, qarm better, p | raw log loss: median diff, qarm better, p "
              "| calibrated log loss: median diff, qarm better, p |", "|---|---:|---|---|---|"]
    for name, v in s["paired"].items():
        cells = [f"{v[k]['median_difference']:+.4f}, {v[k]['qarm_better']} of {v['seeds']}, p={v[k]['sign_test_p']:.2f}"
                 for k in ("test_auc", "test_logloss", "test_logloss_calibrated")]
        lines.append(f"| {name} | {v['seeds']} | " + " | ".join(cells) + " |")
    lines += ["", "Per-epoch holdout AUC / log loss (the kept epoch in bold):", "",
              "| model | seed | " + " | ".join(f"epoch {e + 1}" for e in range(c["epochs"])) + " |",
              "|---|---|" + "---|" * c["epochs"]]
    for r in sorted(report["runs"], key=lambda r: (r["model"], r["seed"])):
        cells = [f"{a:.4f} / {loss:.3f}" for a, loss in zip(r["holdout_auc"], r["holdout_logloss"])]
        cells = [f"**{cell}**" if e + 1 == r["best_epoch"] else cell for e, cell in enumerate(cells)]
        lines.append(f"| {r['model']} | {r['seed']} | " + " | ".join(cells) + " |")
    lines += ["",
              ("fit ex/s: each library's own training loop (FuxiCTR: `fit` minus its per-epoch `eval_step`), "
               "holdout scoring excluded. Peak RSS: resident memory above the worker's value before the model is "
               "built (psutil, 5 ms sampling). Load after: the 1-minute load average after the run. Calibrated "
               "log loss: the kept epoch's test logits through the temperature fitted on its holdout logits "
               "(for FuxiCTR, the same fit on its outputs, which FuxiCTR itself does not do)."), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
