"""The command line: help that explains itself, and bad input ends with a message and a non-zero exit."""
from __future__ import annotations

from pathlib import Path

import pytest

from helpers import cli
from mcmoe_gguf.apps.cli import build_parser

COMMANDS = ("tiny", "convert", "generate", "ppl", "bench", "quantize", "ppl-torch", "inspect", "selfcheck",
            "rpc-server", "runtime", "demo")


def test_help_lists_every_command():
    r = cli("--help", timeout=60)
    assert r.returncode == 0
    for c in COMMANDS:
        assert c in r.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: ") and command in out.splitlines()[0]


def test_unknown_command_and_missing_argument_exit_2():
    r = cli("frobnicate", timeout=60)
    assert r.returncode == 2 and "invalid choice" in r.stderr
    r = cli("convert", timeout=60)
    assert r.returncode == 2 and "required" in r.stderr


def test_bad_input_is_an_error_line_not_a_traceback(tmp_path):
    r = cli("convert", tmp_path / "nope", "-o", tmp_path / "x.gguf", timeout=120)
    assert r.returncode == 1
    assert r.stderr.startswith("mcmoe-gguf: error: ") and "no such model directory" in r.stderr
    assert "Traceback" not in r.stderr
    r = cli("inspect", tmp_path, timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert not (tmp_path / "x.gguf").exists()


@pytest.mark.parametrize("command", ["convert", "quantize"])
def test_bits_and_size_together_are_refused(tmp_path, command):
    r = cli(command, tmp_path, "-o", tmp_path / "x", "--bits", "2.0", "--size", "5MB", timeout=120)
    assert r.returncode == 1 and "give --bits or --size, not both" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("command", ["convert", "quantize"])
def test_a_bad_odp_target_is_refused_by_the_parser(tmp_path, command, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([command, str(tmp_path), "-o", str(tmp_path / "x"), "--odp-target", "skip:2"])
    assert e.value.code == 2
    assert "'median', 'skip:S' with 0 <= S < 1 or 'error:B'" in capsys.readouterr().err
    a = build_parser().parse_args([command, str(tmp_path), "-o", str(tmp_path / "x")])
    assert a.odp_target == "skip:0.225" and a.min_speed is None and a.eps_rows == 0 and a.eps_holdout == 0.0


@pytest.mark.parametrize("args, chosen", [
    ([], ("layer", "auto", "none")),                        # the paper's mcq program: per layer, llama.cpp's mix
    (["--ladder", "full"], ("model", "program", "kl")),     # a ladder: one program for the model and its mix
    (["--ladder", "stock", "--scope", "layer"], ("layer", "auto", "none")),     # an explicit option wins
    (["--ladder", "iq2_xxs,q2_k", "--compat", "stock"], ("model", "auto", "none")),   # the mix program untried
    (["--compat", "stock"], ("model", "auto", "none")),
    (["--compat", "stock", "--scope", "layer"], ("layer", "auto", "none")),
    (["--ladder", "full", "--sensitivity", "none"], ("model", "auto", "none")),
    (["--ladder", "full", "--min-speed", "q2_k"], ("model", "auto", "none")),
    (["--ladder", "full", "--mix", "stock:iq2_s"], ("model", "stock:iq2_s", "none")),
    (["--scope", "model"], ("model", "auto", "none")),
])
@pytest.mark.parametrize("command", ["quantize", "convert"])
def test_defaults_reach_the_quantizer(command, args, chosen, tmp_path, monkeypatch):
    """--scope auto, --mix and --sensitivity left out: filled where each was measured to win, what reaches
    PMQConfig (the quantizer itself replaced: no model is read)."""
    import mcmoe_gguf.apps.cli as cli_mod
    import mcmoe_gguf.gguf.export as export
    import mcmoe_gguf.quant.pmq as pmq
    seen = []

    def fake_quantize(model_dir, outdir, cfg, **kw):
        seen.append(cfg)
        return {"expert_bpw": 2.0, "expert_bytes": 1, "total_bpw": 2.0, "total_bytes": 1}

    def fake_export(workdir, out, **kw):
        Path(out).write_bytes(b"GGUF")
        return Path(out)
    monkeypatch.setattr(pmq, "quantize", fake_quantize)
    monkeypatch.setattr(export, "export_pmq", fake_export)
    monkeypatch.setattr(cli_mod, "kernel_costs", lambda cfg: None)      # --min-speed would time the kernels
    out = ["-o", str(tmp_path / ("x.gguf" if command == "convert" else "w"))]
    assert cli_mod.main([command, str(tmp_path), "--bits", "2", *out, *args]) == 0
    assert [(c.scope, c.mix, c.sensitivity) for c in seen] == [chosen]


@pytest.mark.parametrize("command", ["quantize", "convert"])
def test_kd_options_reach_the_quantizer_and_its_summary_is_printed(command, tmp_path, monkeypatch, capsys):
    import mcmoe_gguf.apps.cli as cli_mod
    import mcmoe_gguf.gguf.export as export
    import mcmoe_gguf.quant.pmq as pmq
    seen = []

    def fake_quantize(model_dir, outdir, cfg, **kw):
        seen.append(cfg)
        return {"expert_bpw": 2.0, "expert_bytes": 1, "total_bpw": 2.0, "total_bytes": 1,
                "kd": {"steps": cfg.kd_steps, "kl_first": 0.25, "kl_last": 0.125, "tuned_tensors": 7, "tuned_floats": 3,
                       "recoded_tensors": 5, "changed_codes": 12345}}
    monkeypatch.setattr(pmq, "quantize", fake_quantize)
    monkeypatch.setattr(export, "export_pmq", lambda workdir, out, **kw: Path(out).write_bytes(b"GGUF") and Path(out))
    out = ["-o", str(tmp_path / ("x.gguf" if command == "convert" else "w"))]
    assert cli_mod.main([command, str(tmp_path), "--bits", "2", *out, "--kd-steps", "40", "--kd-lr", "0.002",
                         "--kd-codes", "0.25"]) == 0
    assert [(c.kd_steps, c.kd_lr, c.kd_codes) for c in seen] == [(40, 0.002, 0.25)]
    printed = capsys.readouterr().out
    assert "KD tuning: 40 steps, KL to the float model on calibration batches 0.2500 -> 0.1250" in printed
    assert "12,345 codes changed in 5 tensors" in printed
    a = build_parser().parse_args([command, str(tmp_path), "-o", str(tmp_path / "y")])
    assert a.kd_steps == 0          # off unless asked for: it needs the float model in RAM
