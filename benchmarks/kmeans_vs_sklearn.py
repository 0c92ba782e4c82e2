"""sqc's weighted k-means against scikit-learn's (the SqueezeLLM release's fitter), row by row.

On SmolLM2-135M rows with their Fisher weights (8 calibration windows) and
the 0.45 % sparse entries removed, compares the weighted objective
sum f (w - c[code])^2 of ``sqc.quant.kmeans.fit_rows`` with per-row
``sklearn.cluster.KMeans(n_clusters=2**bits, n_init="auto", max_iter=50)``
given the Fisher row as ``sample_weight``, and the time of each.

Needs scikit-learn (``pip install scikit-learn``; not a dependency of sqc).
Writes ``benchmarks/results/kmeans.json``.
"""
from __future__ import annotations

import json
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from sqc.passes.annotate_sensitivity import fisher_information  # noqa: E402
from sqc.quant.kmeans import fit_rows  # noqa: E402
from sqc.quant.sparse import sparse_mask  # noqa: E402
from sqc.real import calibration_windows, load_smollm2  # noqa: E402

ROWS = 32
LAYERS = [f"model.layers.{i}.{m}.weight" for i in (2, 15, 28) for m in
          ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]


def weighted_error(w, f, a, c):
    code = np.abs(w[..., None] - c[:, None, :]).argmin(-1)
    return (f * a * (w - np.take_along_axis(c, code, 1)) ** 2).sum(1)


def main() -> int:
    try:
        from sklearn.cluster import KMeans
    except ImportError:
        print("scikit-learn is not installed: pip install scikit-learn", file=sys.stderr)
        return 2
    model, tok = load_smollm2()
    calib = [(w,) for w in calibration_windows(tok, 8)]
    fisher = fisher_information(model, calib, LAYERS, call_kwargs={"use_cache": False})
    params = dict(model.named_parameters())
    out = {"rows_per_layer": ROWS, "layers": LAYERS, "bits": {}}
    for bits in (3, 4):
        ratios, t_ours, t_sk = [], 0.0, 0.0
        for name in LAYERS:
            w_t = params[name].detach()
            mask = sparse_mask(w_t, fisher[name], 0.40, 0.05)
            w = w_t.numpy()[:ROWS]
            f = fisher[name].numpy()[:ROWS]
            a = (~mask).numpy()[:ROWS]
            t = time.perf_counter()
            ours = fit_rows(w, f, a, bits).centroids
            t_ours += time.perf_counter() - t
            sk = []
            t = time.perf_counter()
            for r in range(ROWS):
                km = KMeans(n_clusters=1 << bits, n_init="auto", max_iter=50, random_state=0)
                km.fit(w[r, a[r]].reshape(-1, 1), sample_weight=f[r, a[r]])
                sk.append(np.sort(km.cluster_centers_.ravel()))
            t_sk += time.perf_counter() - t
            ratios.append(weighted_error(w, f, a, ours) / weighted_error(w, f, a, np.array(sk)))
        r = np.concatenate(ratios)
        out["bits"][bits] = {
            "objective_ratio_mean": float(r.mean()),
            "objective_ratio_median": float(np.median(r)),
            "rows_better": int((r < 1).sum()),
            "rows": int(r.size),
            "sqc_s": t_ours,
            "sklearn_s": t_sk,
        }
        print(f"{bits}-bit: sqc/sklearn weighted error mean {r.mean():.3f}, median {np.median(r):.3f}, "
              f"sqc lower on {(r < 1).sum()}/{r.size} rows; sqc {t_ours:.1f} s (incl. compile), sklearn {t_sk:.1f} s")
    path = os.path.join(ROOT, "benchmarks", "results", "kmeans.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as fh:
        json.dump(out, fh, indent=1)
    os.replace(path + ".tmp", path)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
