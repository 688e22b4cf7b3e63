"""Run the lung-ct app (the real pipeline: series selection, segmentation, detection,
radiomics) on every patient of a cohort folder; its results go to ``OUT/<PatientID>/``, where
``train.py --test-app-results OUT`` reads ``radiomics.json``.

    python packaging/models/lung_fusion/app_radiomics.py --cohort /tmp/fusion_test --out DIR
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from radfusion.apps.lung_ct.app import LungCTRunner
from radfusion.config import parse_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cohort", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    index = json.loads((args.cohort / "cohort.json").read_text())
    started, done = time.perf_counter(), 0
    failed: list[str] = []
    with LungCTRunner(parse_config({})) as runner:
        for row in index["patients"]:
            out = args.out / str(row["patient_id"])
            if (out / "sr.dcm").is_file():
                continue  # done by an earlier run
            ct = args.cohort / str(row["directory"]) / "ct"
            try:
                runner.process(sorted(ct.glob("*.dcm")), out)
            except Exception as error:
                failed.append(str(row["patient_id"]))
                print(f"{row['patient_id']}: {type(error).__name__}: {error}", flush=True)
                continue
            done += 1
    print(f"{done} patient(s) in {time.perf_counter() - started:.0f} s; failed: {failed or 'none'}")


if __name__ == "__main__":
    main()
