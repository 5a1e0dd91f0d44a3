"""qarm's FGCNN against a DeepCTR-Torch FGCNN on Frappe: test AUC, log loss, training speed, peak memory.

    python benchmarks/peer_fgcnn_frappe.py                      # 3 seeds, writes benchmarks/results/
    python benchmarks/peer_fgcnn_frappe.py --seeds 0 --epochs 2 # a quick look

Needs the ``bench`` extra (``pip install -c constraints.txt -e ".[bench]"``: deepctr-torch, requests) and
``../shared/data/frappe_nfm_partial`` (skips with a message when either is absent).

**The peer.** DeepCTR-Torch (0.2.x, 0.3.0) has no FGCNN: FGCNN lives in DeepCTR, its TensorFlow sibling
(``deepctr.models.fgcnn``, ``deepctr.layers.FGCNNLayer``). The peer here is that DeepCTR model ported
line by line onto DeepCTR-Torch's own parts: its ``BaseModel`` (inputs, embeddings, ``fit``,
``predict``), ``Conv2dSame``, ``InnerProductLayer``, ``DNN`` and ``PredictionLayer``; the port adds only
the generation layer's wiring (conv 'same' + tanh, max-pool, tanh dense, as in DeepCTR) and DeepCTR's
second embedding set for the generation part. DeepCTR-Torch's stock ``PNN`` (IPNN: FGCNN's classifier
without generated features) runs beside it as an unmodified library model (``--no-ipnn`` to skip).

**Protocol.** Frappe's NFM release has no train part: the validation file is split 80/20 (``--split-seed``),
each model trains ``--epochs`` epochs on the 80%, the epoch with the best AUC on the 20% is kept, and that
model is scored on the test file (AUC: ``sklearn.metrics.roc_auc_score``; log loss). Field codes come
from the training 80% (code 0: a value unseen there), the same integer matrix for every model. Same
seeds, embedding size, batch size, epochs and optimiser (Adam, lr 1e-3) for all; no regularisation
(DeepCTR-Torch's default L2 of 1e-5 on embeddings is set to 0 so both minimise the same loss).

**Measured.** Each (model, seed) runs in its own fresh process on one torch thread:

* ``fit ex/s``: training examples per second of each library's training loop (peer: its ``fit``, one
  call per epoch; qarm: a plain loop over index-sliced batches), holdout evaluation excluded;
* ``step ex/s``: the same loop for every model (forward, mean BCE, backward, Adam step on prepared
  batches), isolating the model's own cost from the loop's;
* ``peak RSS``: the process's resident memory sampled every 5 ms from before the model is built to the
  end of training and testing, minus the value before (psutil RSS; tracemalloc does not see torch's
  tensor allocations).

The machine is shared (other jobs run on the same 2 cores): the load average is printed beside the results.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import os
import sys
import time

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

MODELS = ("qarm_fgcnn", "peer_fgcnn", "peer_ipnn")


# -- models --------------------------------------------------------------------------------------


def build(name: str, sizes: list[int], dim: int, seed: int):
    import torch

    if name == "qarm_fgcnn":
        from qarm.models.fgcnn import FGCNN, FGCNNConfig

        torch.manual_seed(seed)
        return FGCNN(sizes, 1, FGCNNConfig(embedding_dim=dim, **SETTINGS))
    from deepctr_torch.inputs import SparseFeat

    columns = [SparseFeat(f"f{i}", vocabulary_size=s, embedding_dim=dim) for i, s in enumerate(sizes)]
    if name == "peer_ipnn":
        from deepctr_torch.models import PNN

        model = PNN(columns, dnn_hidden_units=SETTINGS["hidden"], l2_reg_embedding=0.0, seed=seed, use_inner=True)
    else:
        model = peer_fgcnn_class()(columns, seed=seed, **SETTINGS)
    model.compile("adam", "binary_crossentropy", metrics=[])  # torch.optim.Adam, lr 1e-3
    return model


def peer_fgcnn_class():
    """DeepCTR's FGCNN (TensorFlow) ported onto DeepCTR-Torch's BaseModel and layers."""
    import torch
    from deepctr_torch.inputs import create_embedding_matrix
    from deepctr_torch.layers import DNN, Conv2dSame, InnerProductLayer
    from deepctr_torch.models.basemodel import BaseModel
    from torch import nn

    class FGCNNLayer(nn.Module):
        """deepctr.layers.FGCNNLayer: conv ('same', tanh) -> max-pool -> dense (tanh), per block."""

        def __init__(self, field_size, embedding_size, filters, kernel_width, new_maps, pooling_width):
            super().__init__()
            self.embedding_size, self.new_maps, self.rows = embedding_size, new_maps, []
            convs, pools, denses, rows, in_ch = [], [], [], field_size, 1
            for f, w, m, p in zip(filters, kernel_width, new_maps, pooling_width):
                convs.append(Conv2dSame(in_ch, f, kernel_size=(w, 1)))
                pools.append(nn.MaxPool2d((p, 1)))
                rows //= p
                denses.append(nn.Linear(rows * embedding_size * f, rows * embedding_size * m))
                self.rows.append(rows)
                in_ch = f
            self.convs, self.pools, self.denses = nn.ModuleList(convs), nn.ModuleList(pools), nn.ModuleList(denses)
            self.out_fields = sum(r * m for r, m in zip(self.rows, new_maps))

        def forward(self, inputs):  # (B, F, E)
            pooling_result = inputs.unsqueeze(1)
            new_features = []
            for conv, pool, dense, rows, m in zip(self.convs, self.pools, self.denses, self.rows, self.new_maps):
                pooling_result = pool(torch.tanh(conv(pooling_result)))
                new_result = torch.tanh(dense(torch.flatten(pooling_result, start_dim=1)))
                new_features.append(new_result.reshape(-1, rows * m, self.embedding_size))
            return torch.cat(new_features, dim=1)

    class PeerFGCNN(BaseModel):
        def __init__(self, dnn_feature_columns, channels, kernel_heights, pooling, new_features, hidden,
                     init_std=0.0001, seed=1024, device="cpu"):
            super().__init__([], dnn_feature_columns, l2_reg_linear=0, l2_reg_embedding=0, init_std=init_std,
                             seed=seed, task="binary", device=device)
            self.fg_embedding_dict = create_embedding_matrix(dnn_feature_columns, init_std, sparse=False,
                                                             device=device)  # DeepCTR's prefix='fg' set
            field_size = len(dnn_feature_columns)
            embedding_size = dnn_feature_columns[0].embedding_dim
            self.fgcnn = FGCNNLayer(field_size, embedding_size, channels, kernel_heights, new_features, pooling)
            n = field_size + self.fgcnn.out_fields
            self.innerproduct = InnerProductLayer(device=device)
            self.dnn = DNN(n * (n - 1) // 2 + n * embedding_size, hidden, activation="relu", l2_reg=0,
                           dropout_rate=0, use_bn=False, init_std=init_std, device=device)
            self.dnn_linear = nn.Linear(hidden[-1], 1, bias=False).to(device)
            self.to(device)

        def forward(self, X):
            deep_emb_list, _ = self.input_from_feature_columns(X, self.dnn_feature_columns, self.embedding_dict)
            fg_emb_list, _ = self.input_from_feature_columns(X, self.dnn_feature_columns, self.fg_embedding_dict)
            fg_input, origin_input = torch.cat(fg_emb_list, dim=1), torch.cat(deep_emb_list, dim=1)
            combined_input = torch.cat([origin_input, self.fgcnn(fg_input)], dim=1)
            inner_product = torch.flatten(self.innerproduct(torch.split(combined_input, 1, dim=1)), start_dim=1)
            linear_signal = torch.flatten(combined_input, start_dim=1)
            dnn_output = self.dnn(torch.cat([linear_signal, inner_product], dim=1))
            return self.out(self.dnn_linear(dnn_output))

    return PeerFGCNN


# -- one (model, seed) in its own process ------------------------------------------------------------


def worker(name: str, seed: int, args: argparse.Namespace) -> dict:
    import torch
    import torch.nn.functional as F
    from sklearn.metrics import log_loss, roc_auc_score

    torch.set_num_threads(1)
    data = load(args.split_seed)
    sizes = [int(s) for s in data["sizes"]]
    peer = name != "qarm_fgcnn"
    x = {split: data[split] for split in ("train", "holdout", "test")}

    def peer_input(codes: np.ndarray) -> dict[str, np.ndarray]:
        return {f"f{i}": codes[:, i] for i in range(codes.shape[1])}

    def predict(model, codes: np.ndarray) -> np.ndarray:
        if peer:
            return model.predict(peer_input(codes), batch_size=8192)[:, 0]
        model.eval()
        with torch.no_grad():
            out = torch.cat([torch.sigmoid(model(torch.from_numpy(codes[s:s + 8192])))[:, 0]
                             for s in range(0, len(codes), 8192)])
        model.train()
        return out.double().numpy()

    with PeakRSS() as memory:
        model = build(name, sizes, args.dim, seed)
        train_seconds, history, best = 0.0, [], (-1.0, -1, None)
        if not peer:
            optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)  # as qarm's trainer
            codes, labels = torch.from_numpy(x["train"]), torch.from_numpy(data["y_train"])
        for epoch in range(args.epochs):
            start = time.perf_counter()
            if peer:
                with contextlib.redirect_stdout(io.StringIO()):  # fit prints the device and sizes
                    model.fit(peer_input(x["train"]), data["y_train"], batch_size=args.batch_size, epochs=1,
                              verbose=0, shuffle=True)
            else:
                order = torch.from_numpy(np.random.default_rng([seed, epoch]).permutation(len(codes)))
                for begin in range(0, len(order), args.batch_size):
                    rows = order[begin:begin + args.batch_size]
                    loss = F.binary_cross_entropy_with_logits(model(codes[rows])[:, 0], labels[rows])
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
            train_seconds += time.perf_counter() - start
            auc = float(roc_auc_score(data["y_holdout"], predict(model, x["holdout"])))
            history.append(round(auc, 5))
            if auc > best[0]:
                best = (auc, epoch, copy.deepcopy(model.state_dict()))
        model.load_state_dict(best[2])
        scores = predict(model, x["test"])
    test_auc = float(roc_auc_score(data["y_test"], scores))
    test_logloss = float(log_loss(data["y_test"], np.clip(scores, 1e-7, 1 - 1e-7)))
    return {"model": name, "seed": seed, "test_auc": test_auc, "test_logloss": test_logloss,
            "best_epoch": best[1] + 1, "holdout_auc": history,
            "fit_examples_per_s": len(x["train"]) * args.epochs / train_seconds, "train_seconds": train_seconds,
            "step_examples_per_s": step_speed(model, x["train"], data["y_train"], peer, args),
            "peak_rss_mib": memory.delta_mib,
            "parameters": int(sum(p.numel() for p in model.parameters())),
            "generated_features": (model.network.n_generated if not peer
                                   else getattr(getattr(model, "fgcnn", None), "out_fields", 0))}


def step_speed(model, codes: np.ndarray, labels: np.ndarray, peer: bool, args: argparse.Namespace) -> float:
    """Examples/s of the same loop for every model: forward, mean BCE, backward, Adam step, prepared batches."""
    import torch
    import torch.nn.functional as F

    model = copy.deepcopy(model).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    order = np.random.default_rng(0).permutation(len(codes))
    batches = []
    for begin in range(0, (args.step_batches + 5) * args.batch_size, args.batch_size):
        rows = order[begin:begin + args.batch_size]
        inputs = torch.from_numpy(codes[rows])
        batches.append((inputs.float() if peer else inputs, torch.from_numpy(labels[rows])))
    start = None
    for i, (inputs, y) in enumerate(batches):
        if i == 5:  # 5 warm-up steps
            start = time.perf_counter()
        out = model(inputs)[:, 0]
        loss = F.binary_cross_entropy(out, y) if peer else F.binary_cross_entropy_with_logits(out, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return args.step_batches * args.batch_size / (time.perf_counter() - start)


# -- the whole run ---------------------------------------------------------------------------------


def main() -> int:
    p = parser(__doc__, MODELS)
    p.add_argument("--step-batches", type=int, default=40, help="timed batches of the same-loop speed")
    p.add_argument("--no-ipnn", action="store_true", help="skip DeepCTR-Torch's stock PNN (IPNN)")
    args = p.parse_args()

    if args.worker:
        args.result.write_text(json.dumps(worker(args.worker, args.seed, args)))
        return 0

    if frappe_folder() is None:
        print(f"SKIPPED: ../shared/data/{FOLDER} is absent (set QARM_SHARED_DATA to the shared data folder).")
        return 0
    try:
        import deepctr_torch  # noqa: F401
    except ImportError:
        print('SKIPPED: deepctr-torch is not installed (pip install -c constraints.txt -e ".[bench]").')
        return 0

    seeds = [int(s) for s in args.seeds.split(",")]
    models = [m for m in MODELS if not (args.no_ipnn and m == "peer_ipnn")]
    data = load(args.split_seed)
    info = {"machine": machine(["deepctr-torch"]), "data": data_info(data),
            "config": {"embedding_dim": args.dim, "batch_size": args.batch_size, "epochs": args.epochs,
                       "optimizer": "Adam lr 1e-3", "selection": "best holdout AUC epoch",
                       "split_seed": args.split_seed, "seeds": seeds, "fgcnn": SETTINGS,
                       "step_batches": args.step_batches}}
    print(json.dumps(info, indent=1))

    runs = run_workers(__file__, models, seeds, [*common_args(args), "--step-batches", str(args.step_batches)],
                       lambda run: f"test AUC {run['test_auc']:.4f}  logloss {run['test_logloss']:.4f}  "
                                   f"fit {run['fit_examples_per_s']:,.0f} ex/s  step {run['step_examples_per_s']:,.0f} "
                                   f"ex/s  peak RSS +{run['peak_rss_mib']:.0f} MiB  best epoch {run['best_epoch']}")
    summary = summarise(runs, models)
    report = {**info, "runs": runs, "summary": summary, "load_average_end": list(os.getloadavg())}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "peer_fgcnn_frappe.json").write_text(json.dumps(report, indent=1) + "\n")
    markdown = to_markdown(report)
    (args.out / "peer_fgcnn_frappe.md").write_text(markdown)
    print(markdown)
    return 0


METRICS = ("test_auc", "test_logloss", "fit_examples_per_s", "step_examples_per_s", "peak_rss_mib")


def summarise(runs: list[dict], models: list[str]) -> dict:
    med = medians(runs, models, METRICS)
    ratios = {k: med["qarm_fgcnn"][k] / med["peer_fgcnn"][k] for k in METRICS}
    goal = {"auc_at_least_peer": med["qarm_fgcnn"]["test_auc"] >= med["peer_fgcnn"]["test_auc"],
            "fit_speed_at_least_2x": ratios["fit_examples_per_s"] >= 2.0,
            "step_speed_at_least_2x": ratios["step_examples_per_s"] >= 2.0}
    return {"medians": med, "ratios_qarm_over_peer_fgcnn": ratios, "goal": goal}


def to_markdown(report: dict) -> str:
    s, m, d, c = report["summary"], report["machine"], report["data"], report["config"]
    lines = ["# qarm FGCNN vs DeepCTR-Torch (FGCNN port, stock IPNN) on Frappe", "",
             (f"Machine: {m['platform']}, {m['cpu_count']} CPUs (shared with other jobs; load average "
              f"{load_text(report['load_average_end'])} at the end), torch {m['torch']}, "
              f"deepctr-torch {m['deepctr-torch']}, 1 torch thread per run."),
             (f"Data: Frappe, train {d['train']:,} / holdout {d['holdout']:,} (80/20 of the validation file, split "
              f"seed {c['split_seed']}), test {d['test']:,}; {d['fields']} fields."),
             (f"Config: embedding {c['embedding_dim']}, batch {c['batch_size']}, {c['epochs']} epochs (best holdout "
              f"AUC kept), Adam lr 1e-3, FGCNN {c['fgcnn']}; seeds {c['seeds']}; medians over seeds."), "",
             "| model | test AUC | test logloss | fit ex/s | step ex/s | peak RSS (MiB) |",
             "|---|---|---|---|---|---|"]
    for name, v in s["medians"].items():
        lines.append(f"| {name} | {v['test_auc']:.4f} | {v['test_logloss']:.4f} | {v['fit_examples_per_s']:,.0f} | "
                     f"{v['step_examples_per_s']:,.0f} | {v['peak_rss_mib']:.0f} |")
    r = s["ratios_qarm_over_peer_fgcnn"]
    lines.append(f"| **qarm / peer FGCNN** | {r['test_auc']:.4f} | {r['test_logloss']:.3f} | "
                 f"{r['fit_examples_per_s']:.2f}x | {r['step_examples_per_s']:.2f}x | {r['peak_rss_mib']:.2f}x |")
    lines += ["", f"Goal (AUC >= peer, speed >= 2x): {s['goal']}", "",
              ("fit ex/s: each library's own training loop (peer: `fit`); step ex/s: one identical loop for every "
               "model. Peak RSS: resident memory above the worker's start (psutil, 5 ms sampling)."), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
