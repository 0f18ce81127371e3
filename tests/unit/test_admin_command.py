"""``moriio-proxy admin``: what each command line sends, and what a person reads back."""

from __future__ import annotations

import pytest

from moriio_proxy.admin.command import render, request_for
from moriio_proxy.cli import build_parser, main
from tests.harness.entries import instance_view

URL = "http://10.0.0.1:10001"


def sent(*argv: str) -> tuple[str, str, dict | None]:
    return request_for(build_parser().parse_args(["admin", URL, *argv]))


def test_each_action_is_one_call_to_the_admin_api():
    target = {"role": "D", "http_address": "10.0.0.2:8200"}
    assert sent("list") == ("GET", "/admin/instances", None)
    assert sent("drain", "d", "10.0.0.2:8200") == ("POST", "/admin/instances/drain", target)
    assert sent("undrain", "D", "10.0.0.2:8200") == ("POST", "/admin/instances/undrain", target)
    assert sent("remove", "D", "10.0.0.2:8200") == ("POST", "/admin/instances/remove", target)
    assert sent("eject", "D", "10.0.0.2:8200") == ("POST", "/admin/instances/eject", target)
    assert sent("eject", "D", "10.0.0.2:8200", "--seconds", "90") == (
        "POST",
        "/admin/instances/eject",
        {**target, "seconds": 90.0},
    )
    assert sent("start-profile") == ("POST", "/start_profile", None)
    assert sent("stop-profile") == ("POST", "/stop_profile", None)


def test_add_sends_the_registration_a_config_file_would_hold():
    zmq = "host:10.0.0.1,handshake:6301,notify:6105"
    argv = ["add", "--role", "p", "--http-address", "10.0.0.1:20005", "--mode", "write",
            "--zmq-address", zmq, "--tp-size", "2"]  # fmt: skip
    assert sent(*argv) == (
        "POST",
        "/admin/instances/add",
        {
            "type": "P",
            "http_address": "10.0.0.1:20005",
            "zmq_address": "host:10.0.0.1,handshake:6301,notify:6105",
            "transfer_mode": "WRITE",
            "dp_size": 1,
            "tp_size": 2,
        },
    )


@pytest.mark.parametrize(
    "argv",
    [
        ["drain", "X", "10.0.0.2:8200"],
        ["drain", "D"],
        ["eject", "D", "10.0.0.2:8200", "--seconds", "0"],
        ["add", "--role", "P", "--http-address", "10.0.0.1:20005"],
        ["reboot"],
    ],
)
def test_bad_usage_exits_2(argv: list[str], capsys: pytest.CaptureFixture[str]):
    with pytest.raises(SystemExit) as caught:
        main(["admin", URL, *argv])
    assert caught.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("moriio-proxy admin")


def test_a_url_that_cannot_be_a_proxy_exits_2(capsys: pytest.CaptureFixture[str]):
    assert main(["admin", "ftp://x", "list"]) == 2
    assert capsys.readouterr().err == (
        "moriio-proxy admin: error: URL must be http:// or https://, got 'ftp://x'\n"
    )


def test_list_prints_one_line_per_instance():
    listing = {
        "transfer_mode": "READ",
        "instances": [
            instance_view("P").to_json(),
            instance_view("D", 8200, state="draining", inflight=3, vllm_version=None).to_json(),
        ],
    }
    lines = render("list", listing).splitlines()
    assert " ".join(lines[1].split()) == (
        "D 10.0.0.2:8200 draining inflight=3 failures=0 READ dp=1 tp=1 version unknown"
    )
    assert lines[0].index("healthy") == lines[1].index("draining")  # in columns
    assert render("list", {"transfer_mode": None, "instances": []}) == (
        "no instance registered (transfer mode unset)"
    )


def test_a_profile_answer_reads_per_instance():
    answer = {
        "instances": [
            {"role": "P", "http_address": "10.0.0.1:20005", "status": 200, "error": None},
            {"role": "D", "http_address": "10.0.0.2:8200", "status": 404, "error": "HTTP 404"},
        ]
    }
    assert render("start-profile", answer) == "P 10.0.0.1:20005: ok\nD 10.0.0.2:8200: HTTP 404"
