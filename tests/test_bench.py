"""The machinery of ``rmt-kernels bench`` on CPU: row schema, FLOP counting, skipped and failed providers,
timing order, the command writing its JSON and PNG (tiny shapes, a few seconds), and the command
refusing bad arguments before the first point runs."""

from __future__ import annotations

import dataclasses
import json
import sys

import pytest
import torch

from rmt_kernels import MemoryLayout, attention_flops, cli
from rmt_kernels.bench import SUITES, attention, handoff, records, shapes, step, timing
from rmt_kernels.bench.plot import plot_attention
from rmt_kernels.bench.records import ROW_FIELDS, Skip, make_row
from rmt_kernels.bench.shapes import AttnShape
from rmt_kernels.bench.timing import TimingConfig

from helpers import check_bench_row

# GQA 2:1, S odd, R != W
TINY = AttnShape("t", "t", 1, 2, 1, 16, 21, 3, 2, ("memory_bidirectional",))
CPU = torch.device("cpu")
ONE_REP = TimingConfig(warmup=1, min_reps=1, max_reps=1, budget_s=0.0)
ENV = {"device": "cpu", "device_name": "test cpu", "torch": torch.__version__, "triton": "x", "cuda": "none",
       "git_commit": "unknown", "git_dirty": None}


def _run(providers, modes=("fwd",), builders=None, shape=TINY):
    return attention.run_attention([shape], modes, providers, CPU, torch.float32, ONE_REP, ENV, builders=builders)


def _with_mask(mask):
    return dataclasses.replace(TINY, masks=(mask,))


# ----------------------------------------------------------------------------------------- rows


def test_make_row_fills_every_field_and_copies_the_environment():
    row = make_row(ENV, suite="attention", provider="p", status="ok")
    assert tuple(row) == ROW_FIELDS
    assert row["device_name"] == "test cpu" and row["git_commit"] == "unknown"
    assert row["median_ms"] is None


@pytest.mark.parametrize(
    "fields, error",
    [
        pytest.param({"status": "ok", "speed": 1.0}, "unknown row fields", id="unknown-field"),
        pytest.param({"status": "skipped"}, "needs a reason", id="skipped-without-reason"),
        pytest.param({"status": "failed", "reason": ""}, "needs a reason", id="failed-empty-reason"),
        pytest.param({"status": "done"}, "status must be one of", id="bad-status"),
    ],
)
def test_make_row_rejects(fields, error):
    with pytest.raises(ValueError, match=error):
        make_row(ENV, **fields)


# ----------------------------------------------------------------------------------------- FLOPs


@pytest.mark.parametrize("mask", [pytest.param(m, id=m) for m in ("causal", "memory_bidirectional", "full")])
def test_flops_are_counted_from_the_mask(mask):
    rows = _run(["sdpa_dense"], modes=("fwd", "bwd", "fwd+bwd"), shape=_with_mask(mask))
    layout = MemoryLayout(TINY.num_read, TINY.num_write, mask=mask)
    ones = int(layout.dense_mask(TINY.segment_len).sum())
    assert layout.visible_pairs(TINY.segment_len) == ones
    factor = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}
    assert [r["mode"] for r in rows] == ["fwd", "bwd", "fwd+bwd"]
    for row in rows:
        check_bench_row(row)
        assert row["status"] == "ok", row["reason"]
        expected = 4 * TINY.batch * TINY.heads_q * TINY.head_dim * ones * factor[row["mode"]]
        assert row["flops"] == expected
        assert row["flops"] == attention_flops(layout, 1, 2, 16, 21, mode=row["mode"])
        assert row["tflops"] == pytest.approx(expected / (row["median_ms"] * 1e-3) / 1e12)
        assert row["pct_peak"] is None  # no honest CPU peak


def test_full_mask_flops_exceed_causal():
    full = MemoryLayout(3, 2, mask="full").visible_pairs(21)
    causal = MemoryLayout(3, 2, mask="causal").visible_pairs(21)
    assert full == 26 * 26 and causal == 26 * 27 // 2


# ----------------------------------------------------------------------------------------- outcomes


def _raises_skip(case):
    raise Skip("not on this machine")


def _wrong(case):
    return attention.Built(lambda q, k, v: torch.zeros_like(q))


def _no_backward(case):
    def fn(q, k, v):
        if q.requires_grad:
            raise NotImplementedError("no backward here")
        return attention.BUILDERS["sdpa_dense"](case).fn(q, k, v)

    return attention.Built(fn)


def _crash_when_timed(case):
    calls = {"n": 0}

    def fn(q, k, v):
        calls["n"] += 1
        if calls["n"] > 2:  # the output check and the warm-up pass, the timed call raises
            raise RuntimeError("boom")
        return attention.BUILDERS["sdpa_dense"](case).fn(q, k, v)

    return attention.Built(fn)


@pytest.mark.parametrize(
    "builder, modes, status, reason",
    [
        pytest.param(_raises_skip, ("fwd",), "skipped", "not on this machine", id="skip-at-build"),
        pytest.param(_no_backward, ("fwd+bwd",), "skipped", "NotImplementedError: no backward here",
                     id="not-implemented-at-warmup"),
        pytest.param(_wrong, ("fwd",), "failed", "forward output differs from sdpa_dense", id="wrong-output"),
        pytest.param(_crash_when_timed, ("fwd",), "failed", "RuntimeError: boom", id="crash-in-timed-call"),
    ],
)
def test_provider_that_cannot_run_gives_a_row_with_its_reason(builder, modes, status, reason):
    builders = dict(attention.BUILDERS, sdpa_composed=builder)
    rows = _run(["sdpa_dense", "sdpa_composed"], modes=modes, builders=builders)
    assert len(rows) == 2 * len(modes)
    for row in rows:
        check_bench_row(row)
    dense = [r for r in rows if r["provider"] == "sdpa_dense"]
    other = [r for r in rows if r["provider"] == "sdpa_composed"]
    assert all(r["status"] == "ok" for r in dense)
    assert all(r["status"] == status and reason in r["reason"] for r in other), other
    assert all(r["ratio_to_best_peer"] is None for r in dense)  # its only peer did not run


def test_unavailable_backends_are_skipped_with_their_reason():
    rows = _run(["sdpa_dense", "cuda", "triton"])
    by = {r["provider"]: r for r in rows}
    assert by["cuda"]["status"] == "skipped" and "cuda" in by["cuda"]["reason"].lower()
    assert by["triton"]["status"] == "skipped" and by["triton"]["reason"]


def test_flex_backward_on_cpu_is_skipped_with_torch_reason_without_compiling():
    rows = _run(["flex"], modes=("fwd+bwd",))
    (row,) = rows
    assert row["status"] == "skipped"
    reason = attention._flex_cpu_grad_probe()
    if reason is None:
        pytest.fail("this torch runs FlexAttention backward on CPU: the probe and its skip are obsolete")
    assert row["reason"] == reason and "NotImplementedError" in reason


def test_speed_of_light_row_is_not_a_peer():
    rows = _run(["sdpa_dense", "sdpa_composed", "sdpa_causal"], shape=TINY)
    by = {r["provider"]: r for r in rows}
    assert records.is_speed_of_light(by["sdpa_causal"])
    assert by["sdpa_composed"]["best_peer"] == "sdpa_dense"
    assert by["sdpa_dense"]["best_peer"] == "sdpa_composed"
    ratio = by["sdpa_dense"]["median_ms"] / by["sdpa_composed"]["median_ms"]
    assert by["sdpa_composed"]["ratio_to_sdpa_dense"] == pytest.approx(ratio)


def test_causal_family_checks_is_causal_as_an_exact_peer():
    rows = _run(["reference", "sdpa_causal"], shape=_with_mask("causal"))
    by = {r["provider"]: r for r in rows}
    assert by["sdpa_causal"]["status"] == "ok" and not records.is_speed_of_light(by["sdpa_causal"])
    assert by["reference"]["best_peer"] == "sdpa_causal"


# ----------------------------------------------------------------------------------------- timing


def test_measure_alternating_times_only_run_in_rotating_order():
    log = []

    def call(name):
        return (lambda slot: log.append(("prepare", name, slot)) or slot), (lambda s: log.append(("run", name, s)))

    cfg = TimingConfig(warmup=1, min_reps=3, max_reps=3, budget_s=0.0)
    out = timing.measure_alternating({"a": call("a"), "b": call("b")}, CPU, cfg, slots=2)
    assert [len(out["a"]), len(out["b"])] == [3, 3]
    runs = [(name, slot) for kind, name, slot in log if kind == "run"]
    assert runs[:2] == [("a", 0), ("b", 0)]  # warm-up
    assert runs[2:] == [("a", 0), ("b", 0), ("b", 1), ("a", 1), ("a", 0), ("b", 0)]


def test_quantiles():
    stats = timing.summarize([5.0, 1.0, 3.0, 2.0, 4.0])
    got = (stats["median_ms"], stats["p20_ms"], stats["p80_ms"], stats["reps"])
    assert got == pytest.approx((3.0, 1.8, 4.2, 5))


@pytest.mark.parametrize(
    "name, dtype, peak",
    [
        pytest.param("NVIDIA H100 80GB HBM3", torch.bfloat16, 989.0, id="h100-sxm"),
        pytest.param("NVIDIA H100 PCIe", torch.float16, 756.0, id="h100-pcie"),
        pytest.param("NVIDIA H200", torch.bfloat16, 989.0, id="h200"),
        pytest.param("NVIDIA A100-SXM4-80GB", torch.bfloat16, 312.0, id="a100"),
        pytest.param("NVIDIA H100 80GB HBM3", torch.float32, None, id="fp32-no-peak"),
        pytest.param("AMD EPYC (2 threads)", torch.bfloat16, None, id="cpu-no-peak"),
    ],
)
def test_peak_table(name, dtype, peak):
    assert records.peak_tflops(name, dtype) == peak


def test_results_are_named_by_device_and_date():
    env = dict(ENV, device="cuda", device_name="NVIDIA H100 80GB HBM3", date="2025-01-02T03:04:05Z")
    assert records.results_stem(env) == "nvidia-h100-80gb-hbm3_2025-01-02"
    env = dict(ENV, device_name="AMD EPYC 7B13 (2 threads)", date="2025-01-02T03:04:05Z")
    assert records.results_stem(env) == "cpu-amd-epyc-7b13_2025-01-02"


# ----------------------------------------------------------------------------------------- noise


def _timed(provider, median, p20, p80, **fields):
    return make_row(ENV, status="ok", provider=provider, median_ms=median, p20_ms=p20, p80_ms=p80, reps=5, **fields)


def test_a_ratio_whose_interval_reaches_one_is_flagged_noisy():
    dense = _timed("sdpa_dense", 10.0, 9.0, 11.0)
    composed = _timed("sdpa_composed", 8.0, 7.5, 8.5)  # 1.25x dense, spreads well apart
    ref = _timed("reference", 12.0, 6.0, 18.0)  # 0.67x composed, but its spread is wider than that
    skipped = make_row(ENV, status="skipped", reason="x", provider="flex")
    rows = [dense, composed, ref, skipped]
    records.fill_ratios(rows, attention.PEERS)
    assert composed["ratio_to_best_peer"] == pytest.approx(10.0 / 8.0)
    assert (composed["ratio_to_best_peer_low"], composed["ratio_to_best_peer_high"]) == pytest.approx(
        (9.0 / 8.5, 11.0 / 7.5)
    )
    assert composed["noisy"] is False and composed["noisy_vs_sdpa_dense"] is False
    assert ref["best_peer"] == "sdpa_composed" and ref["ratio_to_best_peer"] == pytest.approx(8.0 / 12.0)
    assert (ref["ratio_to_best_peer_low"], ref["ratio_to_best_peer_high"]) == pytest.approx((7.5 / 18.0, 8.5 / 6.0))
    assert ref["noisy"] is True and ref["noisy_vs_sdpa_dense"] is True
    assert (ref["ratio_to_sdpa_dense_low"], ref["ratio_to_sdpa_dense_high"]) == pytest.approx((9.0 / 18.0, 11.0 / 6.0))
    assert dense["noisy_vs_sdpa_dense"] is None  # no ratio to itself
    assert skipped["noisy"] is None and skipped["ratio_to_best_peer_low"] is None
    json.loads(json.dumps(rows))
    for row in rows:
        assert tuple(row) == ROW_FIELDS


def test_a_ratio_of_equal_spreads_touching_one_is_noisy():
    assert records.is_noisy(*records.ratio_interval(_timed("a", 2.0, 1.0, 2.0), _timed("b", 4.0, 2.0, 4.0)))
    assert not records.is_noisy(*records.ratio_interval(_timed("a", 2.0, 1.0, 1.9), _timed("b", 4.0, 2.0, 4.0)))


# (suite, its peer provider, the provider compared with it, fields of the suite's rows)
_SUITE_ROWS = {
    "attention": ("sdpa_dense", "sdpa_composed", dict(mask="causal", tflops=1.0, pct_peak=None)),
    "handoff": ("torch_cat", "pack_segment:torch", dict(batch=1, seq_len=12, dim=16, gbps=1.0, pct_copy_bw=50.0)),
    "step": ("official", "rmt_kernels", dict(layers=2, dim=16, batch=1, segments=2, segment_len=8, num_read=2,
                                             peak_mem_mb=1.0)),
    "overhead": ("stock", "rmt_kernels", dict(series="segment_attention", mask="causal", note="eager")),
    "armt": ("einsum", "rmt_kernels:torch", dict(series="block", batch=1, seq_len=12, num_write=2, dim=16)),
}


@pytest.mark.parametrize("suite", sorted(_SUITE_ROWS))
def test_every_printed_table_marks_noisy_ratios(suite, capsys):
    peer, ours, fields = _SUITE_ROWS[suite]
    fields = dict(fields, suite=suite, mode="fwd", dtype="float32")
    clear = [_timed(ours, 10.0, 9.9, 10.1, shape="steady", **fields),  # 2.00x, interval 1.97-2.03
             _timed(peer, 20.0, 19.9, 20.1, shape="steady", **fields)]
    noisy = [_timed(ours, 10.0, 6.0, 14.0, shape="jittery", **fields),  # 1.10x, interval 0.50-2.50
             _timed(peer, 11.0, 7.0, 15.0, shape="jittery", **fields)]
    for point in (clear, noisy):
        records.fill_ratios(point, (peer,), dense="sdpa_dense" if suite == "attention" else None)
    SUITES[suite].print_rows(clear + noisy, ENV)
    out = capsys.readouterr().out
    if suite == "overhead":  # rmt/stock: the inverse ratio
        marked, plain = "~0.91x", "0.50x"
    else:
        marked, plain = f"~1.10x {peer}", f"2.00x {peer}"
    # the first row of each point in the table (the attention suite's summary under it names them again)
    noisy_line = next(line for line in out.splitlines() if "jittery" in line.split())
    clear_line = next(line for line in out.splitlines() if "steady" in line.split())
    assert marked in noisy_line, out
    assert plain in clear_line and "~" not in clear_line, out
    counted = "2 of 4" if suite == "attention" else "1 of 2"  # attention: vs best peer and vs sdpa_dense
    assert f"~: noisy ratio ({counted})" in out and "wider than the margin" in out, out


def test_goal_summary_prints_the_interval_of_the_ratio_to_dense_sdpa(capsys):
    fields = dict(suite="attention", shape="s", mask="causal", mode="fwd+bwd", dtype="float32", tflops=1.0)
    point = [_timed("sdpa_dense", 15.0, 14.0, 16.0, **fields), _timed("sdpa_composed", 10.0, 9.0, 15.0, **fields)]
    records.fill_ratios(point, attention.PEERS)
    SUITES["attention"].print_rows(point, ENV)
    out = capsys.readouterr().out
    assert "1.50x (0.93-1.78) noisy" in out, out


# ----------------------------------------------------------------------------------------- handoff and step


def test_handoff_rows_measure_bandwidth_against_the_copy():
    shape = shapes.HandoffShape("t", 2, 24, 4, 32)
    rows = handoff.run_handoff([shape], handoff.PROVIDERS, CPU, torch.float32, ONE_REP, ENV)
    by = {r["provider"]: r for r in rows}
    for row in rows:
        check_bench_row(row)
    assert by["copy"]["pct_copy_bw"] == pytest.approx(100.0)
    assert by["torch_cat"]["bytes"] == 2 * 2 * 32 * 32 * 4
    assert by["torch_cat"]["gbps"] == pytest.approx(by["torch_cat"]["bytes"] / by["torch_cat"]["median_ms"] / 1e6)
    assert by["pack_segment:cuda"]["status"] == "skipped"


@pytest.fixture(scope="module")
def tiny_gpt2():
    pytest.importorskip("transformers")
    shape = shapes.StepShape("t", "gpt2", 1, 32, 2, 2, 64, 97, 8, 3, 2, 2)
    return shape, step.build_backbone(shape, CPU, torch.float32)


def test_official_step_one_segment_is_one_hf_call(tiny_gpt2):
    shape, model = tiny_gpt2
    rmt = step.OfficialRMT(model, num_mem_tokens=3, segment_size=8, max_n_segments=1)
    ids = torch.randint(0, 97, (2, 8))
    loss, logits = rmt(ids, labels=ids)
    mem = rmt.memory[None].expand(2, -1, -1)
    x = torch.cat([mem, model.get_input_embeddings()(ids), mem], dim=1)
    direct = model(inputs_embeds=x).logits[:, 3:-3]
    torch.testing.assert_close(logits, direct)
    expected = torch.nn.functional.cross_entropy(direct[:, :-1].reshape(-1, 97), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(loss, expected)


def test_official_step_carries_memory_to_the_next_segment(tiny_gpt2):
    shape, model = tiny_gpt2
    rmt = step.OfficialRMT(model, num_mem_tokens=3, segment_size=8, max_n_segments=2)
    ids = torch.randint(0, 97, (1, 16))
    changed = ids.clone()
    changed[0, 0] = (ids[0, 0] + 1) % 97
    with torch.no_grad():
        a, b = rmt(ids)[1], rmt(changed)[1]
    assert not torch.allclose(a[:, 8:], b[:, 8:]), "segment 2 does not see segment 1 through the memory"


@pytest.mark.parametrize(
    "k2, reaches",
    [
        pytest.param(-1, True, id="full-bptt"),
        pytest.param(None, True, id="none-full-bptt"),
        pytest.param(2, False, id="k2-2-detaches"),
        pytest.param(3, True, id="k2-3-beyond-max-segments"),
    ],
)
def test_official_k2_rule(tiny_gpt2, k2, reaches):
    # 3 segments, max_n_segments=3: the memory of segment i=1 is detached iff k2 not in (-1, None) and
    # 1 + k2 <= 3, which cuts every path from the learned memory into segment 2's logits.
    shape, model = tiny_gpt2
    rmt = step.OfficialRMT(model, num_mem_tokens=3, segment_size=8, max_n_segments=3, k2=k2)
    ids = torch.randint(0, 97, (1, 24))
    _, logits = rmt(ids)
    (grad,) = torch.autograd.grad(logits[:, 16:].sum(), rmt.memory, allow_unused=True)
    assert (grad is not None and grad.abs().sum() > 0) == reaches


def test_step_suite_rows(tiny_gpt2):
    shape, _ = tiny_gpt2
    rows = step.run_step([shape], step.PROVIDERS, CPU, torch.float32, ONE_REP, ENV)
    assert len(rows) == len(step.PROVIDERS) * len(step.MODES)
    by = {(r["mode"], r["provider"]): r for r in rows}
    for row in rows:
        check_bench_row(row)
    for mode in step.MODES:  # loss+backward, and the whole training step (clip + AdamW)
        for name in step.PROVIDERS:
            assert by[mode, name]["status"] == "ok", by[mode, name]["reason"]
    assert by["fwd+bwd", "official"]["peak_mem_mb"] > 0
    assert "saved for backward" in by["fwd+bwd", "official"]["peak_mem_kind"]
    assert by["train", "rmt_kernels"]["peak_mem_mb"] is None and by["train", "rmt_kernels"]["best_peer"] == "official"


# ----------------------------------------------------------------------------------------- command


def test_cli_tiny_run_writes_json_and_png(tmp_path, capsys):
    out_json, out_png = tmp_path / "b.json", tmp_path / "b.png"
    rc = cli.main([
        "bench", "--shapes", "tiny", "--suite", "attention", "--modes", "fwd+bwd", "--device", "cpu",
        "--no-progress", "--json", str(out_json), "--plot", str(out_png),
    ])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    record = json.loads(out_json.read_text())
    assert record["schema"] == records.SCHEMA
    assert record["environment"]["device"] == "cpu"
    rows = record["rows"]
    assert len(rows) == 3 * len(attention.PROVIDERS)  # 3 mask families x every provider, skipped included
    for row in rows:
        check_bench_row(row)
        assert row["torch"] == torch.__version__ and row["git_commit"]
    skipped = [r for r in rows if r["status"] == "skipped"]
    assert {r["provider"] for r in skipped} >= {"flex", "triton", "cuda"}
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "torch backend (sdpa_composed) vs dense-mask SDPA" in printed
    assert "skipped [" in printed


def test_cli_rejects_cuda_without_a_gpu(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert cli.main(["bench", "--device", "cuda", "--shapes", "tiny"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------- command edges


def _bench_usage_error(capsys, *argv):
    with pytest.raises(SystemExit) as info:
        cli.main(["bench", "--shapes", "tiny", "--device", "cpu", "--no-progress", *argv])
    captured = capsys.readouterr()
    assert info.value.code == 2
    assert captured.out == ""  # refused before the header, so before any point ran
    return captured.err


def test_cli_json_into_a_missing_folder_is_refused_before_the_run(tmp_path, capsys):
    err = _bench_usage_error(capsys, "--suite", "handoff", "--json", str(tmp_path / "missing" / "b.json"))
    assert "--json" in err and "does not exist" in err


def test_cli_plot_without_matplotlib_is_refused_before_the_run(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    err = _bench_usage_error(capsys, "--suite", "attention", "--plot", str(tmp_path / "b.png"))
    assert "--plot" in err and "matplotlib" in err
    assert not (tmp_path / "b.png").exists()


def _refused(capsys, *argv):
    rc = cli.main(["bench", "--shapes", "tiny", "--device", "cpu", "--no-progress", *argv])
    captured = capsys.readouterr()
    assert rc == 2
    assert captured.out == ""
    assert captured.err.startswith("error: ")
    return captured.err


def test_cli_plot_of_a_suite_without_a_plot_is_refused(tmp_path, capsys):
    err = _refused(capsys, "--suite", "handoff", "--plot", str(tmp_path / "h.png"))
    assert "only the attention suite has a plot" in err
    assert not (tmp_path / "h.png").exists()


def test_plot_refuses_rows_without_an_attention_point(tmp_path):
    shape = shapes.HandoffShape("t", 2, 24, 4, 32)
    rows = handoff.run_handoff([shape], ("torch_cat",), CPU, torch.float32, ONE_REP, ENV)
    skipped = _run(["cuda"])
    with pytest.raises(ValueError, match="no attention point ran"):
        plot_attention(rows + skipped, str(tmp_path / "p.png"), "title")
    assert not (tmp_path / "p.png").exists()


@pytest.mark.parametrize(
    "argv, named",
    [
        pytest.param(["--suite", "handoff", "--providers", "triton"], "the handoff suite", id="other-suite"),
        pytest.param(["--suite", "step", "--providers", "official", "nope"], "the step suite", id="unknown-in-suite"),
        pytest.param(["--providers", "nope"], "any suite", id="unknown-anywhere"),
    ],
)
def test_cli_provider_not_in_the_suite_is_an_argument_error(capsys, argv, named):
    err = _refused(capsys, *argv)
    assert named in err
    suite = argv[1] if argv[0] == "--suite" else None
    valid = SUITES[suite].providers if suite else attention.PROVIDERS + handoff.PROVIDERS + step.PROVIDERS
    assert all(p in err for p in valid), err


def test_cli_prints_flushed_progress_per_point(capsys):
    rc = cli.main(["bench", "--shapes", "tiny", "--suite", "handoff", "--device", "cpu",
                   "--providers", "torch_cat", "copy"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "[1/1] handoff tiny" in captured.err
    assert "torch_cat" in captured.out and "pack_segment:torch" not in captured.out
