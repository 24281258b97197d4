"""apps/quality.py: llama-perplexity --kl-divergence against the F16 file, parsed into PPL ratio, KLD, top-1."""
from __future__ import annotations

import pytest

from mcmoe_gguf.apps.quality import Quality, kld_base, markdown, odp_args, parse_kld, score

SUMMARY = """
chunk             PPL               ln(PPL(Q)/PPL(base))          KL Divergence              Δp RMS            Same top p
   1      72.1234 ±    9.1234       0.01234 ±  0.01000       0.01500 ±  0.00100     2.100 ±  0.100 %    97.000 ±  1.000 %
   2      71.0000 ±    6.0000       0.01100 ±  0.00900       0.01400 ±  0.00090     2.000 ±  0.090 %    96.500 ±  0.900 %
====== Perplexity statistics ======
Mean PPL(Q)                   :  71.000000 ±   6.000000
Mean PPL(base)                :  70.200000 ±   5.900000
Cor(ln(PPL(Q)), ln(PPL(base))):  99.90%
Mean ln(PPL(Q)/PPL(base))     :   0.011000 ±   0.009000
Mean PPL(Q)/PPL(base)         :   1.011061 ±   0.009100
Mean PPL(Q)-PPL(base)         :   0.800000 ±   0.640000

====== KL divergence statistics ======
Mean    KLD:   0.014000 ±   0.000900
Maximum KLD:   3.000000
====== Token probability statistics ======
Mean    Δp: -0.100 ± 0.050 %
Same top p: 96.500 ± 0.900 %
"""


def test_parse_the_summary():
    q = parse_kld(SUMMARY, "x")
    assert q == Quality("x", 71.0, 70.2, 1.011061, 0.0091, 0.014, 0.0009, 96.5, 0.9, 2)
    with pytest.raises(ValueError, match="'top1'"):
        parse_kld(SUMMARY.rsplit("Same top p", 1)[0])       # cut short at exit


@pytest.fixture(scope="module")
def micro_f16(micro, tmp_path_factory):
    from mcmoe_gguf.gguf.export import convert
    return convert(micro["ck"], tmp_path_factory.mktemp("q") / "micro-f16.gguf", outtype="f16", progress=False)


def test_f16_against_itself_and_a_pmq_file(micro, micro_f16, pmq_file, tmp_path):
    text = micro["ck"] / "calib.txt"
    base = kld_base(micro_f16, text, tmp_path / "f16.kld", ctx=64, chunks=6)
    same = score(micro_f16, base, text, "F16", ctx=64, chunks=6)
    assert same.chunks == 6
    assert same.ratio == pytest.approx(1.0, abs=5e-6) and same.kld < 1e-5 and same.top1 == 100.0   # 6 printed decimals
    assert same.ppl == pytest.approx(same.ppl_base, rel=1e-5)     # the base logits are stored compressed
    q = score(pmq_file, base, text, "PMQ", ctx=64, chunks=6)
    assert q.ppl_base == pytest.approx(same.ppl_base, rel=1e-6)      # the same saved F16 logits
    assert q.kld > 1e-4 and q.top1 < 100.0 and q.kld_se > 0
    table = markdown([same, q], {"F16": {"bytes": 1000, "bpw": 16.0, "expert_bpw": 16.0}})
    assert "| F16 | 1,000 | 16.000 | 16.000 |" in table and "| PMQ | | | |" in table


def test_odp_flags_and_counters(micro, micro_f16, pmq_file, tmp_path):
    assert odp_args(False) == ["-fa", "off", "--override-kv", "mcmoe.odp.enabled=bool:false"]
    args = odp_args({"protect": 0.05, "importance": "norm", "flash_attn": True})
    assert args[:3] == ["-fa", "on", "--override-kv"] and len(args) == 4
    assert set(args[3].split(",")) == {"mcmoe.odp.enabled=bool:true", "mcmoe.odp.protect=float:0.05",
                                       "mcmoe.odp.importance=str:norm", "mcmoe.odp.if_calibrated=bool:true"}
    text = micro["ck"] / "calib.txt"
    base = kld_base(micro_f16, text, tmp_path / "f16.kld", ctx=64, chunks=4)
    off = score(pmq_file, base, text, "off", ctx=64, chunks=4)
    on = score(pmq_file, base, text, "on", ctx=64, chunks=4, odp=True)
    more = score(pmq_file, base, text, "x2", ctx=64, chunks=4, odp={"mu_scale": 2.0})
    assert off.skipped is None                                   # the op never ran: no counters printed
    assert 0 < on.skipped < more.skipped <= 0.5                  # at most the second of two experts
    assert more.kld > off.kld
