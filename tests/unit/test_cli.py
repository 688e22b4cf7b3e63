"""The command line, on a spool without a running node."""

from __future__ import annotations

import time
from pathlib import Path

import yaml
from click.testing import CliRunner

from radfusion.cli import main
from radfusion.integrations.store.catalog import Catalog


def test_status_shows_deliveries_awaiting_storage_commitment(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    config = tmp_path / "radfusion.yaml"
    config.write_text(yaml.safe_dump({"spool": {"path": str(spool)}}))
    catalog = Catalog(spool / "catalog.sqlite")
    runner = CliRunner()
    assert (
        "storage commitment" not in runner.invoke(main, ["status", "--config", str(config)]).output
    )
    catalog.add_commitment(
        transaction_uid="9.1",
        destination="pacs",
        ae_title="PACS",
        outbox=spool / "outbox" / "pacs-1",
        study_instance_uid="1.2.3",
        instances={"1.1": ("1.2.840.10008.5.1.4.1.1.66.4", "00000_seg.dcm")},
        deadline=time.time() + 3600,
    )
    result = runner.invoke(main, ["status", "--config", str(config)])
    assert result.exit_code == 0, result.output
    assert "1 delivery(ies) awaiting the destination's storage commitment" in result.output
