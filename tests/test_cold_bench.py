"""The cold benchmark's measurements run and report what they claim (no timings asserted)."""
from __future__ import annotations

import numpy as np

from gpuloader.bench import cold, coldcases


def test_cold_cases_read_and_report(tmp_path):
    files = cold.ensure_files(tmp_path, gb=0.002, gzip_mb=0.2, epochs_mb=0.1)
    assert files["billion"].stat().st_size == 10 ** 9
    assert np.load(files["rows"], mmap_mode="r")[1234, 0] == 1234
    specs = cold.plan_cases(files, batch=64, seconds=0.05, seed=0, raw_threads=[4])
    runs = {}
    for spec in specs:
        spec = dict(spec, epochs=1) if spec["case"] == "epochs-rss" else spec
        if spec["case"] == "torch":
            spec = dict(spec, workers=0)
        runs[spec["name"]] = [coldcases.run(spec)]
    assert runs["1e9 samples"][0]["samples"] == 10 ** 9
    assert runs["1e9 samples"][0]["batch"] == 64
    assert all(r[0]["rows"] > 0 for r in runs.values() if "rows" in r[0])
    n = len(np.load(files["rows"], mmap_mode="r"))
    for name in ("gpuloader shuffle, whole epoch", "torch per-sample w=2, whole epoch"):
        assert runs[name][0]["rows"] == n - n % 64  # every full batch of the epoch
        run = runs[name][0]
        assert 0 < run["rows_per_s_from_start"] <= run["rows"] / run["seconds"]
    bars = cold.bars(runs)
    assert set(bars) >= {"shuffle rows only / raw pread ceiling", "block / raw sequential",
                         "shuffle / torch w=2, whole cold epoch",
                         "gzip block / h5py sequential", "1e9 first batch s"}
    text = cold.table({"median": {k: cold._median(v) for k, v in runs.items()},
                       "drop_check": cold.check_drop(files["rows"], 1), "bars": bars})
    assert "| gpuloader shuffle |" in text and "cache drop check" in text
