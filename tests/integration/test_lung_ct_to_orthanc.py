"""The lung CT app on the network: storescu → node → lung-ct → SEG + SR in a real Orthanc, with
the patient's prior CT fetched from Orthanc by C-MOVE to the node for the comparison."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest

from radfusion.evaluation import compare_with_truth, seg_label_volume
from radfusion.synth.ct_series import synth_ct
from tests.conftest import evidence_uids, require_tool, sr_texts, storescu, wait_for

pytestmark = pytest.mark.integration

SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
CT_CLASS = "1.2.840.10008.5.1.4.1.1.2"
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"  # the fusion summary image


def orthanc_study_instances(orthanc: Any, study_uid: str) -> dict[str, str]:
    """Orthanc instance id → SOP Class UID, for the instances of one study."""
    found = orthanc.post(
        "/tools/find", {"Level": "Study", "Query": {"StudyInstanceUID": study_uid}}
    )
    if not found:
        return {}
    return {
        i["ID"]: orthanc.get(f"/instances/{i['ID']}/simplified-tags")["SOPClassUID"]
        for i in orthanc.get(f"/studies/{found[0]}/instances")
    }


def test_chest_ct_sent_by_storescu_comes_back_as_seg_and_sr_in_orthanc(
    node_factory: Any, orthanc: Any, tmp_path: Path
) -> None:
    geometry: dict[str, Any] = {
        "slices": 64,
        "rows": 256,
        "columns": 256,
        "slice_thickness": 5.0,
        "seed": 5300,
        "tumours": 2,
        "patient_id": "RF-IT-LUNG",
    }
    study = synth_ct(tmp_path / "scanner", **geometry, study_date="20260601")
    # The patient's CT of five months earlier, in the PACS only: the app C-MOVEs it to the node.
    prior = synth_ct(tmp_path / "prior", **geometry, study_date="20260101", tumour_scale=0.8)
    storescu(orthanc.dicom_port, list(prior.files), called="ORTHANC")
    node = node_factory(
        {
            "routing": {
                "rules": [{"name": "chest", "when": {"Modality": "CT"}, "apps": ["lung-ct"]}]
            },
            # Orthanc is asked to commit to the results and reports back to the node.
            "export": {"destinations": [orthanc.destination(storage_commitment={})]},
            "apps": {"lung_ct": {"priors": {"enabled": True, "retrieve": "c-move"}}},
        }
    )
    orthanc.put(
        "/modalities/radfusion", {"AET": "RADFUSION", "Host": "127.0.0.1", "Port": node.port}
    )
    storescu(node.port, list(study.files))
    uid = study.StudyInstanceUID

    wait_for(lambda: len(orthanc_study_instances(orthanc, uid)) == 4, 180, "4 results in Orthanc")
    instances = orthanc_study_instances(orthanc, uid)
    # Only the results (SEG, SR, fusion SR and its image): the CT itself is not forwarded.
    assert sorted(instances.values()) == sorted([SEG_CLASS, SR_CLASS, SR_CLASS, SC_CLASS])
    results = {}
    for instance_id in instances:
        with urllib.request.urlopen(f"{orthanc.url}/instances/{instance_id}/file") as r:
            data = r.read()
        path = tmp_path / f"{instance_id}.dcm"
        path.write_bytes(data)
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        results["FUSION" if ds.SeriesNumber == 903 else ds.SOPClassUID] = path
    seg = pydicom.dcmread(results[SEG_CLASS])
    sr = pydicom.dcmread(results[SR_CLASS])
    fusion = pydicom.dcmread(results["FUSION"])
    summary = pydicom.dcmread(results[SC_CLASS])
    assert seg.StudyInstanceUID == sr.StudyInstanceUID == fusion.StudyInstanceUID == uid
    assert summary.StudyInstanceUID == uid and summary.SeriesNumber == 904
    for path in results.values():
        out = subprocess.run(
            [require_tool("dciodvfy"), str(path)], capture_output=True, text=True, check=False
        )
        assert [ln for ln in (out.stdout + out.stderr).splitlines() if "Error" in ln] == []
    referenced = evidence_uids(sr)
    assert seg.SOPInstanceUID in referenced
    labels, names = seg_label_volume(results[SEG_CLASS], study.files)
    rows = compare_with_truth(labels, names, study.directory)
    lungs = [r.dice for r in rows if r.structure.endswith("lung")]
    assert len(lungs) == 2 and min(lungs) >= 0.95
    assert np.all([r.dice >= 0.85 for r in rows if r.diameter_mm >= 10])
    assert "lung-ct stage seconds" in node.log()
    # Committed by Orthanc: nothing is left waiting in the node's outbox.
    wait_for(lambda: not any((node.spool / "outbox").iterdir()), 30, "the commitment")
    assert "4 instance(s) committed by ORTHANC" in node.log()
    assert "dead letter" not in node.cli("status").stdout
    # The prior came by C-MOVE to the node and went to the comparison only: compared, and
    # neither catalogued nor analysed as a study of its own.
    lines = sr_texts(sr)
    assert any(line.startswith("Compared with the prior CT of 2026-01-01") for line in lines), [
        line for line in lines if "prior" in line
    ]
    with sqlite3.connect(node.spool / "catalog.sqlite") as db:
        assert db.execute(
            "SELECT COUNT(*) FROM instances WHERE StudyInstanceUID=?", (prior.StudyInstanceUID,)
        ).fetchone() == (0,)
    assert set(orthanc_study_instances(orthanc, prior.StudyInstanceUID).values()) == {CT_CLASS}
    # The audit trail has the retrieval, and no C-STORE of the prior's instances to the node.
    trail = [json.loads(line) for line in (node.spool / "audit.jsonl").read_text().splitlines()]
    [moved] = [e for e in trail if e.get("detail") == "C-MOVE of a prior"]
    assert moved["objects"] == [
        {"StudyInstanceUID": prior.StudyInstanceUID, "retrieved": len(prior.files)}
    ]
    stored = {o.get("StudyInstanceUID") for e in trail if e.get("action") == "C"
              for o in e.get("objects", [])}  # fmt: skip
    assert prior.StudyInstanceUID not in stored and "" not in stored and uid in stored
