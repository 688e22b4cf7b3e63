from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from radfusion.config import ConfigError, example_config, load_config, parse_config


def test_embedded_defaults_are_valid() -> None:
    cfg = load_config(None)
    assert cfg.node.ae_title == "RADFUSION"
    assert cfg.completion.quiet_period_s > 0
    assert cfg.node.allowed_callers == []  # nobody, until configured
    assert cfg.node.host == "127.0.0.1"


def test_example_is_valid_and_commented() -> None:
    text = example_config()
    assert text.count("#") > 20
    cfg = parse_config(yaml.safe_load(text))
    assert cfg.node.allowed_callers
    assert cfg.quiet_period_for("CT_SCANNER_1") == 10
    assert cfg.quiet_period_for("OTHER") == cfg.completion.quiet_period_s
    assert [d.name for d in cfg.export.destinations] == ["pacs", "results-folder"]


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"node": {"ae_title": "A\\B"}}, "node.ae_title"),
        ({"node": {"port": 70000}}, "node.port"),
        (
            {"node": {"allowed_callers": [{"ae_title": "X", "addresses": ["10.0.0.300"]}]}},
            "node.allowed_callers.0.addresses",
        ),
        ({"spool": {"pth": "/x"}}, "spool.pth"),
        ({"completion": {"late_arrival": "sometimes"}}, "completion.late_arrival"),
        (
            {"routing": {"rules": [{"name": "r", "when": {"Colour": "red"}, "apps": ["forward"]}]}},
            "routing.rules.0.when",
        ),
        (
            {"routing": {"rules": [{"name": "r", "when": {"Modality": "CT"}, "apps": ["nope"]}]}},
            "routing.rules.0.apps.0",
        ),
        ({"export": {"destinations": [{"name": "a", "type": "ftp"}]}}, "export.destinations.0"),
        (
            {
                "export": {
                    "destinations": [
                        {"name": "a", "type": "folder", "path": "/x"},
                        {"name": "a", "type": "folder", "path": "/y"},
                    ]
                }
            },
            "repeated: a",
        ),
        ({"uid_root": "1.2.abc."}, "uid_root"),
    ],
)
def test_errors_name_the_bad_key(data: dict, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(data)
    assert key in str(err.value)


def test_unreadable_and_non_yaml_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("node: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(listy)


def test_retry_policy_delays() -> None:
    cfg = parse_config(
        {"export": {"retry": {"attempts": 5, "initial_backoff_s": 1, "max_backoff_s": 5}}}
    )
    assert cfg.export.retry.delays() == [1, 2, 4, 5]


def test_allowed_caller_addresses() -> None:
    cfg = parse_config(
        {
            "node": {
                "allowed_callers": [
                    {"ae_title": "CT", "addresses": ["10.1.0.0/16", "192.168.1.5"]},
                    {"ae_title": "ANY"},
                ]
            }
        }
    )
    ct, anyone = cfg.node.allowed_callers or []
    assert ct.permits("10.1.2.3") and ct.permits("192.168.1.5")
    assert not ct.permits("10.2.0.1") and not ct.permits("127.0.0.1")
    assert anyone.permits("203.0.113.9")


def test_triton_tls_needs_key_and_chain_together() -> None:
    with pytest.raises(ConfigError, match="both private_key and certificate_chain"):
        parse_config({"triton": {"url": "t:8001", "tls": {"private_key": "/k.pem"}}})


def test_fhir_tokens_only_over_https_or_loopback() -> None:
    bearer = {"type": "bearer", "token": "secret"}
    with pytest.raises(ConfigError, match="plain http"):
        parse_config({"fhir": {"base_url": "http://fhir.example/R4", "auth": bearer}})
    local = parse_config({"fhir": {"base_url": "http://127.0.0.1:8080/R4", "auth": bearer}})
    assert local.fhir is not None and local.fhir.base_url == "http://127.0.0.1:8080/R4"


def test_fhir_base_url_must_not_hold_credentials() -> None:
    with pytest.raises(ConfigError, match="must not hold credentials"):
        parse_config({"fhir": {"base_url": "https://radfusion:s3cret@fhir.example.org/R4"}})


def test_a_wildcard_caller_admits_any_ae_title_and_an_exact_entry_wins() -> None:
    cfg = parse_config(
        {
            "node": {
                "allowed_callers": [
                    {"ae_title": "*", "addresses": ["10.1.0.0/16"]},
                    {"ae_title": "CT_1", "quiet_period_s": 12},
                ]
            }
        }
    )
    ct = cfg.node.caller("CT_1")
    assert ct is not None and ct.quiet_period_s == 12 and ct.permits("192.168.0.9")
    other = cfg.node.caller("ANYONE")
    assert other is not None and other.permits("10.1.2.3") and not other.permits("10.2.0.1")
    assert cfg.quiet_period_for("ANYONE") == cfg.completion.quiet_period_s
    assert parse_config({}).node.caller("ANYONE") is None


def test_storage_commitment_needs_reports_to_reach_the_node() -> None:
    pacs = {"name": "pacs", "type": "dicom", "ae_title": "PACS", "host": "h", "port": 104}
    committed = {**pacs, "storage_commitment": {"wait_s": 600}}
    with pytest.raises(ConfigError, match="allowed_callers must admit 'PACS'"):
        parse_config({"export": {"destinations": [committed]}})
    admitted = {"node": {"allowed_callers": [{"ae_title": "PACS"}]}}
    cfg = parse_config({**admitted, "export": {"destinations": [committed]}})
    assert cfg.export.destinations[0].storage_commitment.wait_s == 600  # type: ignore[union-attr]
    other = {**committed, "calling_ae_title": "OTHER"}
    with pytest.raises(ConfigError, match="calling_ae_title must be the node's AE title"):
        parse_config({**admitted, "export": {"destinations": [other]}})
    # Without commitment a destination may call as any AE, and need not call back.
    parse_config({"export": {"destinations": [{**pacs, "calling_ae_title": "OTHER"}]}})


def test_priors_come_from_a_pacs_and_c_move_from_a_dicom_one() -> None:
    web = {"name": "pacs", "type": "dicomweb", "url": "https://pacs.example/dicom-web"}
    folder = {"name": "pacs", "type": "folder", "path": "/tmp/out"}
    with pytest.raises(ConfigError, match="'pacs' is a folder"):
        parse_config(
            {
                "export": {"destinations": [folder]},
                "apps": {"lung_ct": {"priors": {"enabled": True}}},
            }
        )
    moved = {"enabled": True, "retrieve": "c-move"}
    with pytest.raises(ConfigError, match="c-move needs a dicom PACS"):
        parse_config({"export": {"destinations": [web]}, "apps": {"lung_ct": {"priors": moved}}})
    dicom = {"name": "pacs", "type": "dicom", "ae_title": "PACS", "host": "h", "port": 104}
    cfg = parse_config(
        {"export": {"destinations": [dicom]}, "apps": {"lung_ct": {"priors": moved}}}
    )
    assert cfg.apps.lung_ct.priors.retrieve == "c-move"
