"""benchmarks/guard_response.py: the guarded runs' tables count falls, lows and changes as stated, and the runs'
CSV reads back what was written."""

from __future__ import annotations

from benchmarks import guard_response as gr


def _entry(loss: str, seed: int, score: float, guarded: float, acts_at: int = 10, response: str = "lower") -> dict:
    return {"pair": "same", "loss": loss, "seed": seed, "start_score": 0.1, "acts_at": acts_at, "score": score,
            "response": response, "guarded": guarded, "guard_step": acts_at, "date": "2026-12-06", "lr": ""}


def test_the_leaderboard_table_averages_each_loss_and_counts_the_changes():
    results = [_entry("a", 0, 0.5, 0.7), _entry("a", 1, 0.3, 0.2, acts_at=20), _entry("b", 0, 0.6, 0.4)]
    lines = gr.leaderboard_table(results).splitlines()
    a = next(line for line in lines if line.startswith("| `a` |"))
    assert a.split(" | ")[1:] == ["0, 1", "10, 20", "0.100", "0.400 ± 0.141", "0.450 ± 0.354", "+0.050 |"]
    b = next(line for line in lines if line.startswith("| `b` |"))
    assert b.split(" | ")[4:] == ["0.600", "0.400", "-0.200 |"]
    every = lines[-1]
    assert every.startswith("| every run acted on, rate cut | 3 runs |")
    assert "(higher on 1, lower on 2, more than 0.05 lower on 2)" in every  # -0.1 and -0.2; +0.2 higher


def test_the_leaderboard_table_sets_the_answers_side_by_side():
    """Each answer in its own columns against the same recorded score, and its own summary row; a loss one answer
    was not run on shows dashes there."""
    results = [_entry("a", 0, 0.5, 0.7), _entry("a", 0, 0.5, 0.56, response="cool"),
               _entry("b", 0, 0.6, 0.4), _entry("b", 1, 0.2, 0.1, response="cool")]
    lines = gr.leaderboard_table(results).splitlines()
    assert lines[0].count("score | change") == 2
    a = next(line for line in lines if line.startswith("| `a` |")).split(" | ")
    assert a[4:] == ["0.500", "0.700", "+0.200", "0.560", "+0.060 |"]
    b = next(line for line in lines if line.startswith("| `b` |")).split(" | ")
    assert b[1] == "0, 1" and b[5:] == ["0.400", "-0.200", "0.100", "-0.100 |"]
    cool = lines[-1]
    assert cool.startswith(f"| every run acted on, rate cut for {gr.GUARD_RECOVER} steps | 2 runs | | | 0.350 ± 0.212 | – | – | ")
    assert "(higher on 1, lower on 1, more than 0.05 lower on 1)" in cool


def test_the_cancellation_table_counts_falls_by_the_margin(monkeypatch):
    label = gr._label(gr.GoldRise.metric, None, "rise")
    runs = [{"mode": "cancellation", "variant": "sampled_token", "seed": seed, "history": history,
             "crossing": {label: acts}}
            for seed, history, acts in ((0, [(0, 0.2), (10, 0.14), (20, 0.3)], 9),   # 0.06 below: falls
                                        (1, [(0, 0.2), (10, 0.16), (20, 0.5)], None))]  # 0.04 below: does not
    runs.append({"mode": "overlap", "variant": "sampled_token", "seed": 0, "history": [(0, 0.2), (10, 0.0)],
                 "crossing": {}})  # another mode's run: not counted
    monkeypatch.setattr(gr, "read_csv", lambda: runs)
    row = next(line for line in gr.cancellation_table().splitlines() if line.startswith("| `sampled_token` |"))
    assert row.split(" | ")[1:] == ["0, 1", "1 of 2", "9, never", "0.150 ± 0.014", "0.400 ± 0.141 |"]


def test_the_runs_csv_reads_back_and_keeps_other_pairs(tmp_path, monkeypatch):
    monkeypatch.setattr(gr, "RUNS_CSV", tmp_path / "runs.csv")
    other = {**_entry("a", 0, 0.5, 0.7), "pair": "cross"}
    gr.write_runs([other, _entry("a", 0, 0.5, 0.6)])
    gr.write_runs([{**_entry("a", 0, 0.5, 0.8), "guard_step": None}])  # the same run again replaces it
    gr.write_runs([_entry("a", 0, 0.5, 0.55, response="cool")])  # another answer's run is kept beside it
    assert gr.read_runs("same", [0]) == [{**_entry("a", 0, 0.5, 0.8), "guard_step": None},
                                         _entry("a", 0, 0.5, 0.55, response="cool")]
    assert gr.read_runs("same", [1]) == [] and gr.read_runs("cross", [0])[0]["guarded"] == 0.7


def test_runs_recorded_before_the_answers_were_named_read_as_the_lasting_cut(tmp_path, monkeypatch):
    monkeypatch.setattr(gr, "RUNS_CSV", tmp_path / "runs.csv")
    (tmp_path / "runs.csv").write_text("pair,loss,seed,start_score,acts_at,score,guarded,guard_step,date\n"
                                       "same,dskd,0,0.082,9,0.606,0.216,9,2026-12-06\n")
    assert gr.read_runs("same", [0])[0]["response"] == "lower"
    gr.write_runs([_entry("dskd", 0, 0.606, 0.5, response="cool")])
    assert [r["response"] for r in gr.read_runs("same", [0])] == ["lower", "cool"]


def _shift_logs(version, shifts: list[float]) -> None:
    version.mkdir(parents=True)
    lines = ["step,diag/policy_shift"] + [f"{step},{value}" for step, value in enumerate(shifts)]
    (version / "metrics.csv").write_text("\n".join(lines) + "\n")


def test_the_step_size_rule_is_read_from_a_runs_own_logs_or_its_rerun(tmp_path, monkeypatch):
    """A guarded run's step from its own `diag/policy_shift`; a run without the guard from `step_size`'s rerun of it;
    neither here: a dash. The rule: the moving mean of 5 steps above 0.03."""
    monkeypatch.setattr(gr, "FAILURE_ROOT", tmp_path / "failure_modes")
    monkeypatch.setattr(gr, "SHIFT_ROOT", tmp_path / "step_size")
    _shift_logs(tmp_path / "failure_modes/depth/on_policy_shift/seed_0/logs/version_0",
                [0.02] * 6 + [0.1] * 4 + [0.0] * 5 + [0.1] * 5)
    _shift_logs(tmp_path / "step_size/depth/on_policy/seed_0/logs/version_0", [0.05] * 8 + [0.0] * 5 + [0.05] * 8)
    _shift_logs(tmp_path / "step_size/depth/on_policy_lr/seed_0/logs/version_0", [0.01] * 8)
    runs = [{"mode": "depth", "variant": variant, "seed": seed, "history": [(0, 0.6), (50, end)], "crossing": {}}
            for variant, seed, end in (("on_policy", 0, 0.4), ("on_policy_lr", 0, 0.7), ("on_policy_shift", 0, 0.65),
                                       ("on_policy_shift", 1, 0.5))]
    monkeypatch.setattr(gr, "read_csv", lambda: runs)
    rows = (("depth", "on_policy", "plain"), ("depth", "on_policy_lr", "low"), ("depth", "on_policy_shift", "guard"))
    lines = gr.failure_table(rows, "shift").splitlines()
    cells = {line.split(" | ")[0][2:]: line.split(" | ")[1:] for line in lines[2:]}
    # the guarded run: the mean of steps 2-6 is (4 * 0.02 + 0.1) / 5 = 0.036, the first above 0.03; below from
    # step 13 (0.1 / 5), above again at step 16 (2 * 0.1 / 5): acts twice. A rerun without the guard: its first act.
    assert cells["plain"][:3] == ["0", "1 of 1", "4"]  # 0.05 from the 5th step on
    assert cells["low"][:3] == ["0", "0 of 1", "never"]
    assert cells["guard"][:3] == ["0, 1", "1 of 2", "6+16, –"]
    assert gr.failure_table(rows, "shift", seeds=[1]).count("\n") == 2  # the seed asked for only
    # the same logs judged at the later limit (`shift05`, 0.05): the rerun's mean of 0.05 is not above it; the
    # guarded run's passes it at step 7 ((3 * 0.02 + 2 * 0.1) / 5 = 0.052; step 6: 0.036) and again at step 17 (0.06)
    lines = gr.failure_table(rows, "shift05").splitlines()
    cells = {line.split(" | ")[0][2:]: line.split(" | ")[1:] for line in lines[2:]}
    assert cells["plain"][:3] == ["0", "1 of 1", "never"]
    assert cells["guard"][:3] == ["0, 1", "1 of 2", "7+17, –"]


def test_the_step_size_answer_picks_the_runs_the_rule_acts_on(tmp_path, monkeypatch):
    """At the recipe's rate and at another (`leaderboard --lr`): each rate's recorded runs, judged on the reruns of
    that rate."""
    import json

    from benchmarks import leaderboard

    monkeypatch.setattr(leaderboard, "WARM_ROOT", tmp_path / "warm")
    monkeypatch.setattr(gr, "SHIFT_ROOT", tmp_path / "step_size")
    for folder, losses in (("warm", ("a", "b", "c")), ("warm_lr0.001", ("a", "b"))):
        (tmp_path / folder).mkdir()
        entries = [{"pair": "same", "loss": loss, "seed": 0, "score": 0.3} for loss in losses]
        (tmp_path / folder / "results.json").write_text(json.dumps(entries))
    _shift_logs(tmp_path / "step_size/same/a/seed_0/logs/version_0", [0.04] * 10)
    _shift_logs(tmp_path / "step_size/same/b/seed_0/logs/version_0", [0.01] * 10)  # c: never rerun, left out
    _shift_logs(tmp_path / "step_size/same_lr0.001/a/seed_0/logs/version_0", [0.01] * 10)
    _shift_logs(tmp_path / "step_size/same_lr0.001/b/seed_0/logs/version_0", [0.01] * 6 + [0.1] * 4)
    assert [(e["loss"], e["acts_at"]) for e in gr.acted_on("same", [0], "shift")] == [("a", 4)]
    # b at 0.001: the mean of steps 3-7 is (3 * 0.01 + 2 * 0.1) / 5 = 0.046, the first above 0.03 (steps 2-6: 0.028)
    assert [(e["loss"], e["acts_at"]) for e in gr.acted_on("same", [0], "shift", lr=0.001)] == [("b", 7)]


def test_guarded_runs_at_another_rate_are_kept_apart(tmp_path, monkeypatch):
    """A guarded run at `--lr` is stored beside the same (loss, seed, answer) at the recipe's rate, not over it, and
    each rate reads back its own; rows written before the rate's column read as the recipe's."""
    path = tmp_path / "runs.csv"
    monkeypatch.setattr(gr, "RUNS_CSV", path)
    path.write_text("pair,loss,seed,start_score,acts_at,score,response,guarded,guard_step,date\n"
                    "same,a,0,0.082,9,0.6,shift,0.5,9,2026-12-06\n")
    row = {**_entry("a", 0, 0.62, 0.64, response="shift"), "lr": "0.001", "date": "2026-12-07"}
    gr.write_runs([row])
    assert [(r["guarded"], r["lr"]) for r in gr.read_runs("same", [0])] == [(0.5, "")]
    assert [(r["guarded"], r["lr"]) for r in gr.read_runs("same", [0], lr=0.001)] == [(0.64, "0.001")]
    gr.write_runs([{**row, "guarded": 0.66}])  # the same run again at that rate: replaced
    assert [r["guarded"] for r in gr.read_runs("same", [0], lr=0.001)] == [0.66]
    assert len(gr.read_runs("same", [0])) == 1


def test_the_leaderboard_table_sets_a_reference_beside_the_answer(tmp_path, monkeypatch):
    """The reference's scores of the same (loss, seed) runs, where recorded: the low rate from the start, read from
    the warm leaderboard's CSV at that rate (its other pairs and lengths left out)."""
    csv_path = tmp_path / "leaderboard_warm_runs.csv"
    monkeypatch.setattr(gr, "WARM_CSV", csv_path)
    (tmp_path / "leaderboard_warm_runs_lr0.001.csv").write_text(
        "pair,loss,seed,steps,score\nsame,a,0,1000,0.6\nsame,a,1,1000,0.8\ncross,a,0,1000,0.1\nsame,b,0,500,0.9\n")
    reference = gr.low_rate_scores("same")
    assert reference == {("a", 0): 0.6, ("a", 1): 0.8}
    results = [_entry("a", 0, 0.5, 0.7, response="shift"), _entry("a", 1, 0.3, 0.2, response="shift"),
               _entry("b", 0, 0.6, 0.4, response="shift")]
    lines = gr.leaderboard_table(results, reference).splitlines()
    assert lines[0].endswith("| a third of the rate from the start: score |")
    assert next(line for line in lines if line.startswith("| `a` |")).endswith("| 0.700 ± 0.141 (2 runs) |")
    assert next(line for line in lines if line.startswith("| `b` |")).endswith("| -0.200 | – |")
    assert lines[-1].endswith("| 0.700 ± 0.141 (2 runs) |")  # every run: the two with a reference
